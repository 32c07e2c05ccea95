#!/usr/bin/env bash
# Next session, call 2 (issue 17, ~3 min; not yet run): the shipped v7 in bfloat16 on the GPU within one
# batch, `--deterministic` (issue 17's "identical to ar on 100/100 in bf16"; v5 gave 100/100, v6 and v7 not
# run), and without it (v5: 85/100), N = 4, greedy, 100 held-out chats.
# Carry [".carry/next_b.sh", ".carry/gguf.last", ".whl"] right after call 1, while the machine is warm.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; H=configs/smollm2/prompts/heldout.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 150 python3 scripts/compare_modes.py --model $M --adapter $A --prompts $H --limit 100 --strides 4 \
  --max-tokens 256 --dtype bfloat16 --deterministic -o $OUT/eval_v7_bf16_deterministic.json 2>&1 | grep -v generating
timeout 100 python3 scripts/compare_modes.py --model $M --adapter $A --prompts $H --limit 100 --strides 4 \
  --max-tokens 256 --dtype bfloat16 -o $OUT/eval_v7_bf16.json 2>&1 | grep -v generating
date -u
