"""Generates guard/v1/*_pb2*.py from proto/ at build time (also for editable installs).

protoc runs with --proto_path=proto and --python_out=. so that
proto/guard/v1/guard.proto becomes guard/v1/guard_pb2.py and the generated
gRPC module imports it absolutely as `from guard.v1 import guard_pb2`.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", "--proto_path=proto", f"--proto_path={well_known}", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
