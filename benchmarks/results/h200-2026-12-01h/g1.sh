#!/usr/bin/env bash
# Call G1 (2026-12-01 afternoon): the engine check on the H200 after the CPU row ops and decoder stack (the
# model's forward and SelfAttention changed; CUDA paths should be untouched): graphs, eager and CPU equal.
# Carry [".carry/g1.sh", ".whl"].
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache PYTHONPATH=$PWD:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import ninja" 2>&1 | tail -1; which g++ c++ 2>&1 | head -2
timeout 240 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt
grep -c "equal" $OUT/engine_check.txt; grep "MISMATCH\|ALL GREEDY\|Error\|differ\|warn\|WARN" $OUT/engine_check.txt | head
date -u
