#!/usr/bin/env bash
# Next session, call 1 (issue 14, ~7 min; not yet run). Does `risd` beat `ar` at C = 64? This session's
# C = 64 `ar` figures moved 24,000-33,000 tok/s from engine to engine. Here each process runs every mode
# twice at C = 64 (a first-run effect shows as run 1 slower than run 2), with --warmup full, and the
# mode order is swapped in the second process. Carry [".carry/next_a.sh", ".carry/gguf.part03", ".whl"]
# after the c1-c3 chain (bash scripts/gpu_stage.sh makes them).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
for modes in "ar,risd" "risd,ar"; do
  date -u
  timeout 270 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes $modes \
    --stride-policy fixed,adaptive --concurrency 64,64 --num-prompts 512 --max-num-seqs 64 --warmup full \
    -o $OUT/bench_c64_${modes/,/_}.json 2>&1 | grep "^ar \|^risd\|K chosen"
done
date -u
