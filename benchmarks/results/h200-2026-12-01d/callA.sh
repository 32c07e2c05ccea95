#!/usr/bin/env bash
# The next GPU session's first real call, not yet run. Here: `bash scripts/gpu_stage.sh`; cp this file to
# .carry/next_session.sh; run .carry/c1.sh, c2.sh, c3.sh as before, then carry [".carry/next_session.sh",
# ".carry/gguf.part03", ".whl"]. About 8 minutes; next_session_b.sh is the second call.
# 1) idlm bench without its old per-step device synchronisation (the default since 2026-12-01) against
#    --sync-steps (how every earlier figure was taken): ar and risd fixed at C = 1 (100 requests) and 64 (256),
#    one engine each way.
# 2) The adaptive policy (looks fixed in 4f21338, 8f8c19b) against fixed and ar over longer runs, C = 1 (32
#    requests), 16 (512), 64 (1024), with the count of decode steps launched ahead (plan changes make the rest wait).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
for sync in "" "--sync-steps"; do
  date -u
  timeout 150 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
    --stride-policy fixed --concurrency 1,64 --max-num-seqs 64 $sync \
    -o $OUT/bench_sync${sync:+_on}.json 2>&1 | grep "^ar \|^risd"
done
for run in "1 32" "16 512" "64 1024"; do
  set -- $run
  date -u
  timeout 120 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
    --stride-policy fixed,adaptive --concurrency $1 --num-prompts $2 --max-num-seqs 64 \
    -o $OUT/bench_c$1.json 2>&1 | grep "^ar \|^risd\|K chosen"
done
date -u
