#!/usr/bin/env bash
# second call of the GGUF chain: part01 to /tmp, then the Qwen3 shapes with overlap off and on
cp .carry/gguf.part01 /tmp/gguf.part01 && ls -la /tmp/gguf.part0*
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
git log --oneline | head -1; date -u
timeout 100 python3 -m idlm bench --shape qwen3-8b --prompt-len 1024 --output-len 128 --concurrency 1 --num-prompts 4 \
  --modes ar,isd --stride 4 --stride-policy fixed --overlap-scheduling off,on -o $OUT/qwen3_8b_c1.json 2>&1 | grep -v "it/s\]" | tail -8
date -u
timeout 130 python3 -m idlm bench --shape qwen3-8b --prompt-len 1024 --output-len 128 --concurrency 32,64 --num-prompts 64 \
  --modes ar,isd --stride 4 --stride-policy fixed --overlap-scheduling off,on -o $OUT/qwen3_8b.json 2>&1 | grep -v "it/s\]" | tail -12
date -u
timeout 80 python3 -m idlm bench --shape qwen3-0.6b --concurrency 1 --num-prompts 8 --output-len 128 \
  --modes ar,isd --stride 4 --stride-policy fixed --overlap-scheduling off,on -o $OUT/qwen3_06b.json 2>&1 | grep -v "it/s\]" | tail -8
date -u
