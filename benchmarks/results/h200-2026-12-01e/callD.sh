#!/usr/bin/env bash
# v7 resumed from its step-550 checkpoint to the end (650), then evaluated against v6; returns the adapter files.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; R=runs/smollm2-risd-v7
ls $R/checkpoints || exit 1
date -u
timeout 200 python3 -m idlm train configs/smollm2/risd_v7.yaml --model $M \
  --init_adapter idlm/adapters/smollm2-risd --progress false >> $OUT/train_v7_resume.log 2>&1
echo "train rc $?"; date -u; tail -n 3 $OUT/train_v7_resume.log
if [ -f $R/final/COMPLETE ]; then V7=$R/final; else V7=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
echo "v7 adapter: $V7"; cp $R/log.jsonl $OUT/train_v7_log.jsonl
cp $V7/adapter_config.json $V7/adapter_model.safetensors $V7/mask_embedding.safetensors $OUT/
timeout 120 python3 scripts/compare_modes.py --model $M --adapter $V7 --prompts configs/smollm2/prompts/heldout.jsonl \
  --limit 100 --strides 4 --temperatures 0 1 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
  -o $OUT/eval_v7_final_fp32.json 2>&1 | grep -v generating
date -u
