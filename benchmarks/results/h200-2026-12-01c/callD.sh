#!/usr/bin/env bash
# Newcomers prefilled together (admit_wait_steps 8) against at once (0), in one engine, alternating: ar, risd fixed,
# risd adaptive at C = 16 and 64 (256 requests) and Poisson arrivals at 84 req/s.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 420 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 16,64 --request-rate 84 --num-prompts 256 --max-num-seqs 64 \
  --admit-wait-steps 0,8 -o $OUT/bench_admit.json 2>&1 | grep "^ar \|^risd\|K chosen\|req/s"
date -u
