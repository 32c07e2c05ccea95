#!/usr/bin/env bash
# The next GPU session's first real call, not yet run. Here: `bash scripts/gpu_stage.sh`; cp this file to
# .carry/next_session.sh; run .carry/c1.sh, c2.sh, c3.sh as before, then carry [".carry/next_session.sh",
# ".carry/gguf.part03", ".whl"].
# The adaptive policy (looks fixed in 4f21338) against fixed and ar over longer runs, each in one engine:
# C = 1 (32 requests), 16 (512), 64 (1024) with --warmup short (what a server meets), C = 64 with --warmup full
# (no graph captured in a timed run), and Poisson arrivals at 84 req/s (ITL p99 / p50). About 8 minutes.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
for run in "short 1 32" "short 16 512" "short 64 1024" "full 64 1024"; do
  set -- $run
  date -u
  timeout 150 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
    --stride-policy fixed,adaptive --concurrency $2 --num-prompts $3 --max-num-seqs 64 --warmup $1 \
    -o $OUT/bench_$1_c$2.json 2>&1 | grep "^ar \|^risd\|K chosen"
done
date -u
timeout 200 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 64 --request-rate 84 --num-prompts 256 --max-num-seqs 64 \
  -o $OUT/bench_poisson.json 2>&1 | grep "^ar \|^risd\|req/s"
date -u
