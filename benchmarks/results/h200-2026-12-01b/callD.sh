#!/usr/bin/env bash
# 2026-12-01 call D: 1) the step costs measured up to 64 requests in an engine whose pool is sized by default
# (call C's run of this failed on a missing import; call B's ran out of memory before the shared logits buffer);
# 2) the stride policy with its 10% margin for rounds, C = 64 closed loop with refills and Poisson arrivals at about
# 80% of ar's closed-loop rate, and C = 1; 3) every GPU kernel of an ar step at C = 1.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 150 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --requests 64 \
  --modes risd:adaptive -o $OUT/breakdown_default_pool.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_default_pool.txt
grep "C=64\|\[decode\|Error" $OUT/breakdown_default_pool.txt | head -12
date -u
timeout 130 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 64 --max-num-seqs 64 --request-rate 84 -o $OUT/bench_c64.json 2>&1 \
  | grep "^ar \|^risd"
date -u
timeout 70 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy adaptive --concurrency 1 --num-prompts 16 --max-num-seqs 64 -o $OUT/bench_c1.json 2>&1 \
  | grep "^ar \|^risd"
date -u
timeout 80 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 1 --requests 2 \
  --modes ar --gpu-profile -o $OUT/breakdown_ar_c1.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_ar_c1.txt
grep "GPU kernels" $OUT/breakdown_ar_c1.txt
date -u
