#!/usr/bin/env bash
# 2026-12-01 call E: a fresh engine's adaptive policy at C = 1 and C = 16 after looks became two steps long
# (call D: at C = 1 it never left AR).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 120 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy adaptive --concurrency 1,16 --num-prompts 16 --max-num-seqs 64 -o $OUT/bench_c1_c16.json 2>&1 \
  | grep "^ar \|^risd\|K chosen"
date -u
