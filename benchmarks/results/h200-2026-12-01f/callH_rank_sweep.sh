#!/usr/bin/env bash
# Call H (issue 17's rank sweep, short): rank 8 and 24 on all seven projections, 48 on attention only, same data
# (3,000 v2 prompts, answered greedily by the base here) and 120 steps each, side by side, then greedy and T = 1
# acceptance by position on the 100 held-out chats (scripts/gpu_loss_comparison.sh). After the c1.. chain; carry
# [".carry/callH_rank_sweep.sh", ".carry/gguf.last", ".whl"].
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache PYTHONPATH=$PWD:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
VARIANTS="r8=--lora_rank 8 --lora_alpha 16;r24=--lora_rank 24 --lora_alpha 48;attn48=--lora_rank 48 --lora_alpha 96 --lora_targets [q_proj,k_proj,v_proj,o_proj]" \
  SUMMARY=rank_sweep.json N_PROMPTS=3000 STEPS=120 TRAIN_LIMIT=250 OUT=$OUT/sweep MODEL=/tmp/smollm2.gguf \
  timeout 560 bash scripts/gpu_loss_comparison.sh 2>&1 | grep -v "it/s\]" | tail -25
rm -f $OUT/sweep/adapter_best.tar $OUT/sweep/onpolicy_v2.tar.gz
