#!/usr/bin/env bash
# Call 1 of 2026-12-01 (after `bash scripts/gpu_stage.sh` here and the three copy
# calls there): carry [".carry/check_and_policy.sh", ".carry/gguf.part03", ".whl"], a copy of this file in .carry/
# 1) the engine check, now with refills (a prefill launched ahead of a decode step in flight: never
#    checked on a GPU so far); 2) the default stride policy (adaptive) against fixed at C = 64 and 1,
#    where `risd` fixed ran 0.74x `ar` at C = 64: does the default keep `risd` >= `ar`?
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 150 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt; grep -c "equal" $OUT/engine_check.txt
grep "refills\|MISMATCH\|ALL GREEDY" $OUT/engine_check.txt
date -u
timeout 200 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed,adaptive \
  --concurrency 64,1 --max-num-seqs 64 -o $OUT/bench_policy.json 2>&1 | grep -v "it/s\]\|clean_up\|dequantis\|loading" | tail -12
date -u
