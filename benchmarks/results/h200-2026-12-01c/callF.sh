#!/usr/bin/env bash
# C = 64 over 1024 requests (16 waves, so the drain at the end weighs a quarter of what it did over 256):
# warmup full (no graph captured in a timed run) for ar, risd fixed, risd adaptive; then warmup short for ar and
# risd adaptive (the adaptive policy's looks capture graphs in the timed run).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 250 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 64 --num-prompts 1024 --max-num-seqs 64 --warmup full \
  -o $OUT/c64_1024_full.json 2>&1 | grep "^ar \|^risd\|K chosen"
date -u
timeout 150 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy adaptive --concurrency 64 --num-prompts 1024 --max-num-seqs 64 \
  -o $OUT/c64_1024_short.json 2>&1 | grep "^ar \|^risd\|K chosen"
date -u
