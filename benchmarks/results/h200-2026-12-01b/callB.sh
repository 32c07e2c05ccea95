#!/usr/bin/env bash
# 2026-12-01 call B: the stride policy after its two fixes (steps timed only between steps of the same requests;
# the table scaled, not offset) at C = 64 with refills and C = 1; then where the host's time goes (cProfile) in
# ar and risd:adaptive at C = 1 and C = 64.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 220 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed,adaptive \
  --concurrency 64,1 --max-num-seqs 64 -o $OUT/bench_policy.json 2>&1 | grep -v "it/s\]\|clean_up\|dequantis\|loading" | tail -14
date -u
timeout 110 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 1 --requests 6 \
  --modes ar,risd:adaptive --cprofile 45 -o $OUT/breakdown_c1.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_c1.txt
grep "C=1\|\[decode" $OUT/breakdown_c1.txt | head
date -u
timeout 170 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --requests 256 \
  --modes ar,risd:adaptive --cprofile 45 -o $OUT/breakdown_c64.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_c64.txt
grep "C=64\|\[decode" $OUT/breakdown_c64.txt | head -20
date -u
