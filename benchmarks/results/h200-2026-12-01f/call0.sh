#!/usr/bin/env bash
# Call 0 (issue 14's Must show and its Qwen3 targets on the current code; no GGUF needed, so it runs first):
# the engine check (graphs, eager and CPU equal; arrivals mid-decode; refills), the Triton kernels' oracle,
# then the Qwen3-8B shape (C = 1, 32, 64) and the Qwen3-0.6B shape (C = 1, with transformers beside it).
# Carry [".carry/call0.sh", ".whl"].
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache PYTHONPATH=$PWD:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
date -u; git log --oneline -1 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 170 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt
grep -c "equal" $OUT/engine_check.txt; grep "MISMATCH\|ALL GREEDY\|Error\|differ" $OUT/engine_check.txt | head
date -u
timeout 110 python3 benchmarks/check_triton_attention.py --checks-only > $OUT/check_triton_attention.txt 2>&1
tail -3 $OUT/check_triton_attention.txt
date -u
timeout 190 python3 -m idlm bench --shape qwen3-8b --modes ar,isd --stride 4 --stride-policy fixed --branches 0 \
  --concurrency 1,32,64 --prompt-len 1024 --output-len 32 --num-prompts 64 -o $OUT/qwen3_8b.json 2>&1 \
  | grep "^ar \|^isd\|roofline\|bandwidth\|Error"
date -u
timeout 90 python3 -m idlm bench --shape qwen3-0.6b --modes ar,isd --stride 4 --stride-policy fixed --branches 0 \
  --concurrency 1 --prompt-len 1024 --output-len 64 --num-prompts 8 --hf-baseline -o $OUT/qwen3_06b.json 2>&1 \
  | grep "^ar \|^isd\|^hf\|transformers\|roofline\|bandwidth\|Error"
date -u
