#!/usr/bin/env bash
# 2026-12-01 call F (the last 40 s of device time): does a fresh engine's adaptive policy leave AR at C = 1 now that
# looks last two steps and steps that captured a graph are not timed?
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
timeout 34 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes risd --warmup short \
  --stride-policy adaptive --concurrency 1 --num-prompts 8 --max-num-seqs 8 -o $OUT/bench_c1.json 2>&1 | grep "risd"
