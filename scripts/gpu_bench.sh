#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and the project's packages importable by $PYTHON): the CUDA
# tests, then the seeds' workload on a VLM-R1-Qwen2.5VL-3B-shaped random checkpoint in bf16 —
# in-process decode steps, the server under `python -m core.bench`, and transformers beside it.
#
#   scripts/gpu_bench.sh [STAGE ...]    stages: tests checkpoint steps server hf (default: all)
#
# Environment: PYTHON (python3), OUT (results folder, ./bench-results/gpu), CKPT (checkpoint
# folder, /tmp/vlm-r1-3b; built when missing), PARALLEL / NUMBER (the sweep, "1 4 8 16 32" /
# "4 8 16 32 64"), MAX_TOKENS (512), HF_BATCHES ("1,32"), HF_BENCH (the peer harness's
# hf_bench.py; the `hf` stage needs it and is the only one that does).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench-results/gpu}
CKPT=${CKPT:-/tmp/vlm-r1-3b}
PARALLEL=${PARALLEL:-1 4 8 16 32}
NUMBER=${NUMBER:-4 8 16 32 64}
MAX_TOKENS=${MAX_TOKENS:-512}
HF_BATCHES=${HF_BATCHES:-1,32}
HF_BENCH=${HF_BENCH:-}
PORT=${PORT:-8000}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests checkpoint steps server hf)
say() { printf '\n==== %s  %s\n' "$(date +%T)" "$*"; }

for stage in "${stages[@]}"; do
  case $stage in
    tests)
      say "CUDA tests"
      $PYTHON -m pytest -q -p no:cacheprovider tests/devices/test_cuda_paged_attention.py \
        tests/actors/test_decode_graphs.py tests/models/test_decoder_matches_hf.py \
        tests/devices/test_cpu_platform.py -k "cuda or kernel or replayed" 2>&1 | tail -15
      ;;
    checkpoint)
      if [ ! -f "$CKPT/config.json" ]; then
        say "building $CKPT"
        $PYTHON scripts/make_bench_checkpoint.py --out "$CKPT" --shape vlm-r1-3b --init-device cuda
      fi
      ;;
    steps)
      say "decode steps in-process (bf16)"
      $PYTHON scripts/bench_decode_step.py --model "$CKPT" --device cuda --batch 1 8 32 \
        --context 700 --steps 60 | tee "$OUT/steps.txt"
      ;;
    server)
      say "server sweep: parallel $PARALLEL, number $NUMBER, $MAX_TOKENS tokens"
      $PYTHON -m core.launch --model "$CKPT" --device cuda --port "$PORT" --max-model-len 4096 \
        --max-num-seqs 32 --max-num-batched-tokens 8192 >"$OUT/server.log" 2>&1 &
      server=$!
      trap 'kill $server 2>/dev/null || true' EXIT
      for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        kill -0 $server 2>/dev/null || { tail -40 "$OUT/server.log"; exit 1; }
        sleep 1
      done
      # shellcheck disable=SC2086
      $PYTHON -m core.bench --url "http://127.0.0.1:$PORT/v1" --dataset random_vl \
        --prompt-tokens 100 --tokenizer "$CKPT" --image-num 1 --image-width 640 \
        --image-height 640 --max-tokens "$MAX_TOKENS" --min-tokens "$MAX_TOKENS" \
        --temperature 0 --extra-args '{"ignore_eos": true}' --parallel $PARALLEL \
        --number $NUMBER --warmup 2 --output-dir "$OUT/tessera" --no-progress
      kill $server; wait $server 2>/dev/null || true
      trap - EXIT
      grep -E "stats|step" "$OUT/server.log" | tail -5 || true
      ;;
    hf)
      say "transformers generate on the same GPU"
      [ -f "$HF_BENCH" ] || { echo "hf stage: set HF_BENCH to the peer harness's hf_bench.py" >&2; exit 2; }
      sed -e 's/attn_implementation=args.attn).eval()/attn_implementation=args.attn).eval().to("cuda")/' \
          -e 's/return proc(text=\[chat\] \* bs, images=imgs, return_tensors="pt", padding=True)/return proc(text=[chat] * bs, images=imgs, return_tensors="pt", padding=True).to("cuda")/' \
          "$HF_BENCH" >"$OUT/hf_bench_cuda.py"
      $PYTHON "$OUT/hf_bench_cuda.py" --model "$CKPT" --dtype bfloat16 --batch-sizes "$HF_BATCHES" \
        --reps 1 --new-tokens "$MAX_TOKENS" --json "$OUT/hf.json"
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
