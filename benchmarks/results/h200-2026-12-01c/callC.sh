#!/usr/bin/env bash
# The adaptive policy after three fixes (a step planned twice counted once; a look lasts until its round was
# timed 3 times, or 8 steps, and comes at once where no round was timed near this batch size; no margin over AR
# at one request): adaptive against fixed and ar in one engine, C = 1, 16, 64.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 200 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 1 --num-prompts 16 --max-num-seqs 64 -o $OUT/bench_c1.json 2>&1 \
  | grep "^ar \|^risd\|K chosen"
date -u
timeout 200 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 16,64 --num-prompts 256 --max-num-seqs 64 -o $OUT/bench_c16_c64.json 2>&1 \
  | grep "^ar \|^risd\|K chosen"
date -u
