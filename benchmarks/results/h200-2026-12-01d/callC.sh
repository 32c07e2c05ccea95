#!/usr/bin/env bash
# Issue 17, call C: v6 = v5 trained on with TV over every v2 answer call B made (configs/smollm2/risd_v6.yaml,
# at most ~420 s; resumable), then v6 and v5 on the 100 held-out chats (N = 4, float32, greedy and T = 1).
# Carry [".carry/callC.sh", ".carry/gguf.part03", ".whl", ".carry/v2answers"] (the gzipped shards from call B,
# used when the machine went cold in between).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; D=data/smollm2-v2; mkdir -p $D/shards
[ -s $D/shards/answers_00.jsonl ] || cp /tmp/v2shards/answers_*.jsonl $D/shards/ 2>/dev/null || \
  for g in .carry/v2answers/answers_*.jsonl.gz; do gunzip -c "$g" > $D/shards/$(basename "$g" .gz); done
cp $D/shards/answers_00.jsonl $D/heldout_onpolicy.jsonl
find $D/shards -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | xargs cat > $D/onpolicy.jsonl
wc -l $D/heldout_onpolicy.jsonl $D/onpolicy.jsonl; date -u
timeout 420 python3 -m idlm train configs/smollm2/risd_v6.yaml --model $M --init_adapter idlm/adapters/smollm2-risd \
  --progress false > $OUT/train_v6.log 2>&1
echo "train rc $?"; date -u; tail -n 3 $OUT/train_v6.log
R=runs/smollm2-risd-v6
if [ -f $R/final/COMPLETE ]; then V6=$R/final; else V6=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
echo "v6 adapter: $V6"; cp $R/log.jsonl $OUT/train_v6_log.jsonl
for pair in "v6 $V6" "v5 idlm/adapters/smollm2-risd"; do
  set -- $pair
  timeout 150 python3 scripts/compare_modes.py --model $M --adapter $2 --prompts configs/smollm2/prompts/heldout.jsonl \
    --limit 100 --strides 4 --temperatures 0 1 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
    -o $OUT/eval_$1_fp32.json > $OUT/eval_$1.log 2>&1 &
done
wait; date -u
tar -cf $OUT/adapter_v6.tar -C $(dirname $V6) $(basename $V6)
python3 - $OUT <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("eval_*_fp32.json")):
    r = json.loads(p.read_text())
    for x in r["runs"]:
        print(p.name, x.get("temperature"), x.get("identical"), round(x["tpf"], 3), [round(a, 2) for a in x["draft_acceptance"]])
PY
