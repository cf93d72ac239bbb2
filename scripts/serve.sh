#!/usr/bin/env bash
# Install (first run only) and start the OpenAI-compatible server. Flags go to core.launch;
# with no --model it serves the embedded SmolLM2-135M-Instruct.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
exec .venv/bin/python -m core.launch "$@"
