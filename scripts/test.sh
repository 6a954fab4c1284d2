#!/usr/bin/env bash
# The whole test suite from a fresh clone: install, then pytest (unit + real-vLLM integration).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/bootstrap.sh
set +e
$PYTHON -m pytest -q -rs --durations=15 "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
exit $status
