#!/usr/bin/env bash
# Call R48 (issue 17, ~9.5 min): does the shipped v7 gain from more rank, or from answers weighted to chat?
# Three runs side by side from v7, STEPS steps each of 16 rows, tv, lr 3e-4 (risd_v7.yaml otherwise):
#   r48      v7 grown to rank 48 (alpha 96: the same alpha / rank, so it starts exactly at v7), the 25,000 v2
#            answers of shards 01-05 (tracked in benchmarks/results/h200-2026-12-01d/v2answers)
#   chat24   rank 24, those answers plus two more copies of their chat ones (kinds v1, templates2, math)
#   chat48   rank 48 grown, the chat-weighted answers
# (the control, rank 24 on the plain answers, is v8-tv of 12-01g: TPF 1.85, as v7). Then all three on the
# 100 held-out chats (float32, N = 4, greedy and T = 1). Back: results.tar.gz and the best adapter, split.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; D=data/smollm2-v2; S=$D/shards; mkdir -p $S; date -u
for g in benchmarks/results/h200-2026-12-01d/v2answers/*.gz; do gunzip -c "$g" > $S/$(basename "$g" .gz); done
cp $S/answers_00.jsonl $D/heldout_onpolicy.jsonl
find $S -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | xargs cat > $D/onpolicy.jsonl
python3 - <<'PY'
import gzip, json
kinds = {}
for line in gzip.open("configs/smollm2/prompts/v2/train.jsonl.gz", "rt"):
    row = json.loads(line)
    kinds[row["prompt"]] = row["kind"]
lines = open("data/smollm2-v2/onpolicy.jsonl").read().splitlines()
chat = [l for l in lines if kinds.get(json.loads(l)["messages"][0]["content"]) in ("v1", "templates2", "math")]
open("data/smollm2-v2/onpolicy_chat3.jsonl", "w").write("\n".join(lines + chat + chat) + "\n")
print(f"{len(lines)} answers, {len(chat)} chat, chat-weighted {len(lines) + 2 * len(chat)}")
PY
STEPS=${STEPS:-250}
run() {  # name data extra-args...
  local name=$1 data=$2; shift 2
  timeout ${TRAIN_LIMIT:-330} python3 -m idlm train configs/smollm2/risd_v7.yaml --model $M --data "[$data]" \
    --init_adapter idlm/adapters/smollm2-risd --output_dir runs/$name "$@" \
    --stages "[{stride: 4, steps: $STEPS}]" --progress false > $OUT/train_$name.log 2>&1 &
}
run r48 $D/onpolicy.jsonl --lora_rank 48 --lora_alpha 96
run chat24 $D/onpolicy_chat3.jsonl
run chat48 $D/onpolicy_chat3.jsonl --lora_rank 48 --lora_alpha 96
wait; date -u
for name in r48 chat24 chat48; do
  R=runs/$name
  if [ -f $R/final/COMPLETE ]; then V=$R/final; else V=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
  echo "$name adapter: $V"; tail -n 2 $OUT/train_$name.log; cp $R/log.jsonl $OUT/train_${name}_log.jsonl
  ln -sfn $PWD/$V runs/$name.use
  timeout ${EVAL_LIMIT:-150} python3 scripts/compare_modes.py --model $M --adapter $V --prompts configs/smollm2/prompts/heldout.jsonl \
    --limit 100 --strides 4 --temperatures 0 1 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
    -o $OUT/eval_${name}_fp32.json > $OUT/eval_$name.log 2>&1 &
done
wait; date -u
python3 - <<'PY'
import json, os
best, out = None, os.environ["OUT"]
for name in ("r48", "chat24", "chat48"):
    try:
        d = json.load(open(f"{out}/eval_{name}_fp32.json"))
    except OSError:
        print(name, "no eval"); continue
    for r in d["runs"]:
        print(name, f"T={r['temperature']} identical={r.get('identical')} tpf={r['tpf']:.3f}",
              " ".join(f"{a:.3f}" for a in r["draft_acceptance"]))
    g = next(r for r in d["runs"] if r["temperature"] == 0)
    if g.get("identical") == 100 and (best is None or g["tpf"] > best[1]):
        best = (name, g["tpf"])
print("best", best)
open(f"{out}/best.txt", "w").write(best[0] if best else "")
PY
B=$(cat $OUT/best.txt)
if [ -n "$B" ]; then
  tar -C runs/$B.use -cf /tmp/adapter_$B.tar adapter_config.json adapter_model.safetensors mask_embedding.safetensors
  split -b 15M -d /tmp/adapter_$B.tar $OUT/adapter_$B.tar.part
fi
tar -C $OUT -czf $OUT/results.tar.gz $(cd $OUT && ls train_* eval_* best.txt) && (cd $OUT && rm -f train_* eval_* best.txt)
ls -la $OUT; date -u
