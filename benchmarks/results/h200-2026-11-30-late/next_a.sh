#!/usr/bin/env bash
# next session, first call (no GGUF): carry [".carry/next_a.sh", ".whl"]
# the widened LoRA kernel's oracle to its end, then the whole engine check (graphs/eager/CPU, arrivals)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
git log --oneline | head -1; date -u
timeout 200 python3 benchmarks/check_triton_lora.py --json $OUT/lora_kernels.json 2>&1 | tee $OUT/lora_kernels.txt | tail -25
date -u
timeout 200 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" | tee $OUT/engine_check.txt | tail -40
date -u
# the step built inside its graph (off by default until this passes)
IDLM_GRAPHED_BUILD=1 timeout 200 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" | tee $OUT/engine_check_graphed_build.txt | tail -40
date -u
