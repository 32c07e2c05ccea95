#!/usr/bin/env bash
# Call V8 (issue 17, ~9.5 min): the shipped v7 trained on with the `length` draft loss against `tv`, side by
# side from the same start on the same 25,000 v2 answers (shards 01-05, tracked in
# benchmarks/results/h200-2026-12-01d/v2answers; v7 read all 51,629), STEPS steps each of 16 rows at lr 3e-4
# (configs/smollm2/risd_v7.yaml otherwise), then both on the 100 held-out chats (float32, greedy and T = 1).
# Carry [".carry/v8.sh", ".carry/gguf.last", ".whl"] after the c1.. chain.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; D=data/smollm2-v2; S=$D/shards; mkdir -p $S
for g in benchmarks/results/h200-2026-12-01d/v2answers/*.gz; do gunzip -c "$g" > $S/$(basename "$g" .gz); done
cp $S/answers_00.jsonl $D/heldout_onpolicy.jsonl
find $S -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | xargs cat > $D/onpolicy.jsonl
wc -l $D/heldout_onpolicy.jsonl $D/onpolicy.jsonl; date -u
STEPS=${STEPS:-300}
for loss in tv length; do
  timeout ${TRAIN_LIMIT:-340} python3 -m idlm train configs/smollm2/risd_v7.yaml --model $M \
    --init_adapter idlm/adapters/smollm2-risd --draft_loss $loss --output_dir runs/v8-$loss \
    --stages "[{stride: 4, steps: $STEPS}]" --progress false > $OUT/v8_train_$loss.log 2>&1 &
done
wait; date -u
for loss in tv length; do
  R=runs/v8-$loss
  if [ -f $R/final/COMPLETE ]; then V=$R/final; else V=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
  echo "$loss adapter: $V"; tail -n 2 $OUT/v8_train_$loss.log; cp $R/log.jsonl $OUT/v8_train_${loss}_log.jsonl
  mkdir -p $OUT/v8-$loss && cp $V/adapter_config.json $V/adapter_model.safetensors $V/mask_embedding.safetensors $OUT/v8-$loss/
  timeout ${EVAL_LIMIT:-170} python3 scripts/compare_modes.py --model $M --adapter $V --prompts configs/smollm2/prompts/heldout.jsonl \
    --limit 100 --strides 4 --temperatures 0 1 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
    -o $OUT/v8_eval_${loss}_fp32.json > $OUT/v8_eval_$loss.log 2>&1 &
done
wait; date -u
for loss in tv length; do echo "== $loss"; tail -n 5 $OUT/v8_eval_$loss.log; done
