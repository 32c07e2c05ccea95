#!/usr/bin/env bash
# first call (no GGUF): carry [".carry/next_a.sh", ".whl"]
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
git log --oneline | head -1; date -u
timeout 60 python3 benchmarks/check_rope_kv.py --json $OUT/rope_kv.json 2>&1 | tail -30 | tee $OUT/rope_kv.txt
date -u
timeout 170 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" | tee $OUT/engine_check.txt | tail -45
date -u
IDLM_FUSED_ROPE_KV=1 timeout 150 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" | tee $OUT/engine_check_rope.txt | tail -8
date -u
IDLM_GRAPHED_BUILD=1 timeout 150 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" | tee $OUT/engine_check_graphed.txt | tail -8
date -u
