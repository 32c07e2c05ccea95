#!/usr/bin/env bash
# 2026-12-01 call A: the committed code's kernel and engine checks, then where a step of each (K, rows) goes
# in ar and risd:adaptive at C = 64 with refills (why a K = 0 step of a risd run cost more than an ar step).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 130 python3 benchmarks/check_triton_lora.py --json $OUT/check_triton_lora.json > $OUT/check_triton_lora.txt 2>&1
grep -i "fail\|passed\|gate_up" $OUT/check_triton_lora.txt | tail -5
date -u
timeout 110 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt; grep -c "equal" $OUT/engine_check.txt
grep "MISMATCH\|ALL GREEDY\|Error" $OUT/engine_check.txt | head
date -u
timeout 240 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --requests 256 \
  --modes ar,risd:adaptive --gpu-profile -o $OUT/breakdown_adaptive_c64.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_adaptive_c64.txt
grep "C=64\|\[" $OUT/breakdown_adaptive_c64.txt | head -30
date -u
