#!/usr/bin/env bash
# Call ANC2 (issue 17): run c of anc.sh (lr 3e-4, clean_weight 4) continued on the same warm machine from its
# step-175 checkpoint to 450 steps (N = 4 stage 150 -> 350; its cosine schedule stretched), and run e from the base at
# lr 6e-4, clean_weight 4, 300 steps; both then evaluated as in anc.sh.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
M=/tmp/smollm2.gguf; D=data/smollm2-v2; S=$D/shards; mkdir -p $S $OUT/w; date -u
for g in benchmarks/results/h200-2026-12-01d/v2answers/*.gz; do gunzip -c "$g" > $S/$(basename "$g" .gz); done
cp $S/answers_00.jsonl $D/heldout_onpolicy.jsonl; ls -d runs/anc-*/checkpoints/* 2>&1 | tail -n 4
find $S -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | xargs cat > $D/onpolicy.jsonl
run() {  # name lr clean_weight steps-at-N=4
  local name=$1 lr=$2 w=$3 n4=$4
  timeout ${TRAIN_LIMIT:-390} python3 -m idlm train configs/smollm2/idlm_v2.yaml --model $M --data "[$D/onpolicy.jsonl]" \
    --eval_data "[$D/heldout_onpolicy.jsonl]" --clean_loss kl --draft_loss tv --lr $lr --grad_accum 1 \
    --output_dir runs/anc-$name --save_every 25 --progress false \
    --stages "[{stride: 2, steps: 50, clean_weight: $w}, {stride: 3, steps: 50, clean_weight: $w}, {stride: 4, steps: $n4, clean_weight: $w}]" \
    > $OUT/w/train_$name.log 2>&1 &
}
run c 3e-4 4 350; run e 6e-4 4 200
wait; date -u
python3 -m idlm eval perplexity configs/smollm2/heldout_text.txt --model $M -o $OUT/w/ppl_base.json > $OUT/w/ppl_base.log 2>&1 &
for name in c e; do
  R=runs/anc-$name
  if [ -f $R/final/COMPLETE ]; then V=$R/final; else V=$(ls -d $R/checkpoints/step-* | grep -v '\.tmp$' | tail -n 1); fi
  echo "$name: $V"; tail -n 2 $OUT/w/train_$name.log; cp $R/log.jsonl $OUT/w/train_${name}_log.jsonl
  echo "$V" > $OUT/w/ckpt_$name.txt
  timeout ${EVAL_LIMIT:-150} python3 scripts/compare_modes.py --model $V --mode isd --prompts configs/smollm2/prompts/heldout.jsonl \
    --limit 100 --strides 4 --temperatures 0 1 --seed 0 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 \
    -o $OUT/w/eval_$name.json > $OUT/w/eval_$name.log 2>&1 &
  timeout ${EVAL_LIMIT:-150} python3 -m idlm eval perplexity configs/smollm2/heldout_text.txt --model $V \
    -o $OUT/w/ppl_$name.json > $OUT/w/ppl_$name.log 2>&1 &
done
wait; date -u
python3 - <<'PY'
import json, os
from pathlib import Path
w = Path(os.environ["OUT"]) / "w"
load = lambda n: json.loads((w / n).read_text()) if (w / n).is_file() else None
base = load("ppl_base.json")
summary = {"perplexity_base": base["summary"]["perplexity"] if base else None}
for name in "ce":
    recs = [json.loads(l) for l in (w / f"train_{name}_log.jsonl").read_text().splitlines()] if (w / f"train_{name}_log.jsonl").is_file() else []
    evals = [r for r in recs if "eval_acceptance" in r]
    s = {"checkpoint": (w / f"ckpt_{name}.txt").read_text().strip() if (w / f"ckpt_{name}.txt").is_file() else None,
         "steps": recs[-1]["step"] if recs else 0, "last_clean_kl": recs[-1]["ce_clean"] if recs else None,
         "heldout_expected_acceptance": [(r["step"], r["eval_acceptance"]) for r in evals]}
    cmp = load(f"eval_{name}.json")
    for run in (cmp or {}).get("runs", []):
        s["greedy" if run["temperature"] == 0 else "T1"] = {"tpf": run["tpf"], "acceptance": run["draft_acceptance"],
                                                           "identical": run.get("identical")}
    ppl = load(f"ppl_{name}.json")
    if ppl and base:
        s["perplexity"] = ppl["summary"]["perplexity"]
        s["perplexity_change"] = ppl["summary"]["perplexity"] / base["summary"]["perplexity"] - 1
    summary[name] = s
(w.parent / "anc_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
for name in "ce":
    s = summary[name]
    print(name, "steps", s["steps"], "kl", s["last_clean_kl"], "greedy", s.get("greedy"), "T1", s.get("T1"),
          "ppl", s.get("perplexity"), s.get("perplexity_change"), "heldout", s["heldout_expected_acceptance"][-1:] )
PY
tar -C $OUT -czf $OUT/anc_results.tar.gz w && rm -rf $OUT/w
ls -la $OUT; date -u
