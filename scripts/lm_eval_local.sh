#!/usr/bin/env bash
# lm-eval's `local-completions` log-likelihood evaluation against a Tessera server, unmodified:
# a small local multiple-choice task (scripts/lm_eval_task/) scored through /v1/completions with
# echo + logprobs, as lm-eval sends them.
#
#   scripts/lm_eval_local.sh [MODEL_FOLDER]
#
# MODEL_FOLDER: an HF checkpoint folder with a tokenizer (lm-eval tokenizes locally); default: a
# tiny random-weight Qwen2 built by the tests' fixture (its accuracy means nothing; the point
# is that the harness runs). lm-eval and its light dependencies go to $LM_EVAL_DIR (default
# /tmp/tessera-lm-eval), never into the project's venv; lm-eval needs no torch of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LM_EVAL_DIR=${LM_EVAL_DIR:-/tmp/tessera-lm-eval}
PORT=${PORT:-8313}
MODEL=${1:-}
if [ ! -d "$LM_EVAL_DIR/lm_eval" ]; then
  $PY -m pip install -q --target "$LM_EVAL_DIR" --no-deps "lm-eval==0.4.13"
  $PY -m pip install -q --target "$LM_EVAL_DIR" datasets evaluate pytablewriter rouge-score \
    sacrebleu scikit-learn sqlitedict dill word2number more_itertools tenacity aiohttp tiktoken
fi
if [ -z "$MODEL" ]; then
  MODEL=$LM_EVAL_DIR/tiny-qwen2
  [ -f "$MODEL/config.json" ] || $PY -c "from tests.fixtures.checkpoints import \
make_qwen2_checkpoint as m; m('$MODEL')"
fi
task_dir=$(mktemp -d)
sed "s#DATA#$PWD/scripts/lm_eval_task/data.jsonl#" scripts/lm_eval_task/tessera_local.yaml \
  >"$task_dir/tessera_local.yaml"
$PY -m core.launch --model "$MODEL" --served-model-name evaluated --port "$PORT" \
  --max-model-len 512 --log-level warning >"$task_dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$task_dir"' EXIT
for _ in $(seq 180); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
# lm-eval's own packages after the project's (the project's numpy and transformers win)
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $PY -c "import sys; sys.path.append('$LM_EVAL_DIR'); \
sys.argv[0] = 'lm_eval'; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \
  --model local-completions \
  --model_args "model=evaluated,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$MODEL,tokenizer_backend=huggingface,num_concurrent=1,max_retries=1" \
  --tasks tessera_local --include_path "$task_dir"
