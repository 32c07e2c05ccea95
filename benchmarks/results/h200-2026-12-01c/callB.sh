#!/usr/bin/env bash
# Why a K = 0 step of risd requests costs more than an ar step (C = 64: 3.15 ms seen against 2.0):
# step_breakdown with risd held at K = 0 (policy k0) beside ar and the adaptive policy, step kinds, host sections,
# cProfile's top host functions; then at C = 1.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 240 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --requests 256 \
  --modes ar,risd:k0,risd:adaptive --cprofile 30 -o $OUT/breakdown_c64.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_c64.txt
grep "C=64\|\[" $OUT/breakdown_c64.txt
date -u
timeout 120 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 1 --requests 4 \
  --modes ar,risd:k0,risd:adaptive,risd:fixed -o $OUT/breakdown_c1.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_c1.txt
grep "C=1\|\[" $OUT/breakdown_c1.txt
date -u
