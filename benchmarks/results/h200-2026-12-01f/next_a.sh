#!/usr/bin/env bash
# Next session, call 1 (issue 14, ~8 min; not yet run). The adaptive policy's two changes of 2026-12-01 07:00
# (a request's own acceptance counts fade while it runs AR steps; a look at AR steps where rounds won on a
# guessed AR price) against the fixed stride and ar, on one engine, the v7 adapter: at C = 1 the adaptive
# policy had trailed fixed by 2% (its AR stretches, 20% of plans, accepted no worse than the rest). Then
# C = 16 and 64 twice over (does it still match fixed there?).
# Carry [".carry/next_a.sh", ".carry/gguf.last", ".whl"] after the c1.. chain (bash scripts/gpu_stage.sh).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 230 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 1 --num-prompts 48 --max-num-seqs 16 --warmup full --repeats 3 \
  -o $OUT/bench_c1_policy.json 2>&1 | grep "^ar \|^risd\|K chosen\|captured"
date -u
timeout 300 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 16,64 --num-prompts 256 --max-num-seqs 64 --warmup full --repeats 2 \
  -o $OUT/bench_c16_c64_policy.json 2>&1 | grep "^ar \|^risd\|K chosen\|captured"
date -u
