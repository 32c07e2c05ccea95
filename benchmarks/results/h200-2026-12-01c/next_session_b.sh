#!/usr/bin/env bash
# The next GPU session's second call, not yet run (carry as next_session.sh, this file instead): C = 64 over
# 1,024 requests with --warmup full (no graph captured in a timed run), and Poisson arrivals at 84 req/s.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 250 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 64 --num-prompts 1024 --max-num-seqs 64 --warmup full \
  -o $OUT/bench_full_c64.json 2>&1 | grep "^ar \|^risd\|K chosen"
date -u
timeout 200 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 64 --request-rate 84 --num-prompts 256 --max-num-seqs 64 \
  -o $OUT/bench_poisson.json 2>&1 | grep "^ar \|^risd\|req/s"
date -u
