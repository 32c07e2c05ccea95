#!/usr/bin/env bash
# Next session, call 3 (issue 17, ~9.5 min; not yet run): v7 = the shipped v6 trained on with TV over every v2
# answer (configs/smollm2/risd_v7.yaml, 650 steps: what one call holds at ~1.6 steps/s), resumable from its
# 25-step checkpoint by the same command; then v7 (or its newest checkpoint) and v6 on the 100 held-out chats
# (float32, greedy and T = 1).
# Each call returns the newest adapter's three files (not trainer_state.pt: 88 MB), so a machine that went
# cold loses at most the optimizer state (then pass the returned adapter as --init_adapter).
# Carry [".carry/next_c.sh", ".carry/gguf.last", ".whl"] (+ ".carry/v2answers" if the machine went cold).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; D=data/smollm2-v2; S=$D/shards; mkdir -p $S
[ -s $S/answers_11.jsonl ] || cp /tmp/v2shards/answers_*.jsonl $S/ 2>/dev/null || true
for g in benchmarks/results/h200-2026-12-01d/v2answers/*.gz .carry/v2answers/*.gz; do
  [ -f "$g" ] && [ ! -s $S/$(basename "$g" .gz) ] && gunzip -c "$g" > $S/$(basename "$g" .gz); done
cp $S/answers_00.jsonl $D/heldout_onpolicy.jsonl
find $S -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | xargs cat > $D/onpolicy.jsonl
wc -l $D/heldout_onpolicy.jsonl $D/onpolicy.jsonl; date -u
timeout ${TRAIN_LIMIT:-440} python3 -m idlm train configs/smollm2/risd_v7.yaml --model $M \
  --init_adapter idlm/adapters/smollm2-risd --progress false >> $OUT/train_v7.log 2>&1
echo "train rc $?"; date -u; tail -n 2 $OUT/train_v7.log
R=runs/smollm2-risd-v7
if [ -f $R/final/COMPLETE ]; then V7=$R/final; else V7=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
echo "v7 adapter: $V7"; cp $R/log.jsonl $OUT/train_v7_log.jsonl
mkdir -p $OUT/v7 && cp $V7/adapter_config.json $V7/adapter_model.safetensors $V7/mask_embedding.safetensors $OUT/v7/
if [ -n "$V7" ]; then
  for pair in "v7 $V7" "v6 idlm/adapters/smollm2-risd"; do
    set -- $pair
    timeout 150 python3 scripts/compare_modes.py --model $M --adapter $2 --prompts configs/smollm2/prompts/heldout.jsonl \
      --limit 100 --strides 4 --temperatures 0 1 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
      -o $OUT/eval_$1_fp32.json > $OUT/eval_$1.log 2>&1 &
  done
  wait; date -u
fi
# (call 5, if time is left, ~2 min: where a training step goes on the H200, for the R-ISD run's 46k tokens/s
#  against 88k for a full fine-tune of the same shape on an H100 in benchmarks/train_throughput.py:
#  python3 benchmarks/train_profile.py configs/smollm2/risd_v7.yaml --model $M --init_adapter idlm/adapters/smollm2-risd
#  --steps 6 --warmup 2 > $OUT/train_profile.txt)
