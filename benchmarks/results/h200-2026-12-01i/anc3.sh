#!/usr/bin/env bash
# Call ANC3 (issue 17), same warm machine as anc.sh / anc2.sh: alpha at T = 1 of runs e and c (`idlm eval alpha`,
# the 100 held-out chats, N = 4, fixed stride, no branches, seed 0), and run c continued from 450 to 600 steps
# (N = 4 stage 350 -> 500) under TRAIN_LIMIT, then evaluated as before.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; D=data/smollm2-v2; mkdir -p $OUT/w; date -u; ls -d runs/anc-*/final
for name in e c; do
  python3 -m idlm eval alpha configs/smollm2/prompts/heldout.jsonl --chat --model runs/anc-$name/final --mode isd --stride 4 \
    --stride-policy fixed --branches 0 --temperature 1 --seed 0 --max-tokens 256 --kv-cache-tokens 65536 \
    -o $OUT/w/alpha_$name.json > $OUT/w/alpha_$name.log 2>&1 &
done
cp -r runs/anc-c/final runs/anc-c-450
timeout ${TRAIN_LIMIT:-200} python3 -m idlm train configs/smollm2/idlm_v2.yaml --model $M --data "[$D/onpolicy.jsonl]" \
  --eval_data "[$D/heldout_onpolicy.jsonl]" --clean_loss kl --draft_loss tv --lr 3e-4 --grad_accum 1 \
  --output_dir runs/anc-c --save_every 25 --progress false \
  --stages "[{stride: 2, steps: 50, clean_weight: 4}, {stride: 3, steps: 50, clean_weight: 4}, {stride: 4, steps: 500, clean_weight: 4}]" \
  > $OUT/w/train_c600.log 2>&1
date -u
R=runs/anc-c
if [ -f $R/final/COMPLETE ] && grep -q '"step": 600' $R/log.jsonl; then V=$R/final; else V=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
echo "c600: $V"; cp $R/log.jsonl $OUT/w/train_c600_log.jsonl
timeout 100 python3 scripts/compare_modes.py --model $V --mode isd --prompts configs/smollm2/prompts/heldout.jsonl \
  --limit 100 --strides 4 --temperatures 0 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
  -o $OUT/w/eval_c600.json > $OUT/w/eval_c600.log 2>&1 &
timeout 100 python3 -m idlm eval perplexity configs/smollm2/heldout_text.txt --model $V -o $OUT/w/ppl_c600.json > $OUT/w/ppl_c600.log 2>&1 &
wait; date -u
for f in alpha_e alpha_c eval_c600 ppl_c600; do echo "== $f"; tail -n 4 $OUT/w/$f.log | cut -c1-400; done
tail -n 1 $OUT/w/train_c600_log.jsonl | cut -c1-400
tar -C $OUT -czf $OUT/anc3_results.tar.gz w && rm -rf $OUT/w; date -u
