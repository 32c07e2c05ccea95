#!/usr/bin/env bash
# Issue 17: the I-DLM conversion with an acceptance-driven noisy stream (configs/smollm2/idlm_v2.yaml:
# KL(p || q) to its own clean stream, CE on the clean stream, T = 1 answers, lr 2.5e-5), trained and
# evaluated on one GPU in one call (490 s on an H200 with the defaults, measured 2026-11-30).
#
#   OUT=/path/results MODEL=/tmp/smollm2.gguf bash scripts/gpu_idlm_v2.sh
#
#   1. the base answers the first N_PROMPTS (3500) v2 training prompts and the 300 held-out prompts
#      at T = 1 (seed 0) in one `idlm distill` call -> data/smollm2-v2/onpolicy_t1.jsonl and
#      heldout_onpolicy_t1.jsonl (skipped when they are there, e.g. carried from an earlier call)
#   2. trains configs/smollm2/idlm_v2.yaml (DRAFT_LOSS overrides its kl; STAGES its 3 x 100 steps)
#      under `timeout TRAIN_LIMIT` (330 s); held-out acceptance by position every 25 steps
#   3. greedy isd == ar, TPF and acceptance by position at N = 4 (float32) and at T = 1; clean-stream
#      perplexity of the conversion and of the base on configs/smollm2/heldout_text.txt
# $OUT: idlm_v2_summary.json, results_idlm_v2.tar.gz (train log, eval JSONs, timings),
# onpolicy_t1_v2.tar.gz, timings.txt. The checkpoint (257 MiB) stays on the machine
# (scripts/checkpoint_delta.py packs it for the trip, in 5 parts).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
MODEL=${MODEL-/tmp/smollm2.gguf}
PY=${PY:-python3}
N_PROMPTS=${N_PROMPTS:-3500}
DRAFT_LOSS=${DRAFT_LOSS:-kl}
STAGES=${STAGES:-"[{stride: 2, steps: 100, clean_weight: 0.2}, {stride: 3, steps: 100, clean_weight: auto}, {stride: 4, steps: 100, clean_weight: auto}]"}
TRAIN_LIMIT=${TRAIN_LIMIT:-330}
MAX_TOKENS=${MAX_TOKENS:-256}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi
DATA=data/smollm2-v2
RUN=runs/smollm2-idlm-v2-$DRAFT_LOSS
WORK=$OUT/work_idlm
mkdir -p "$OUT" "$WORK" "$DATA"
T0=$SECONDS
log() { echo "== +$((SECONDS - T0)) s $(date +%H:%M:%S) $*" | tee -a "$OUT/timings.txt"; }
log "idlm v2: model=$MODEL n_prompts=$N_PROMPTS draft_loss=$DRAFT_LOSS"

if [ -s "$DATA/onpolicy_t1.jsonl" ] && [ -s "$DATA/heldout_onpolicy_t1.jsonl" ]; then
  log "distill: answers already in $DATA; skipped"
else
  "$PY" scripts/onpolicy_sets.py prompts "$N_PROMPTS" "$DATA/prompts_t1.jsonl"
  log "distill (T = 1): start"
  "$PY" -m idlm distill "$DATA/prompts_t1.jsonl" "$DATA/all_t1.jsonl" "${model_args[@]}" --mode ar --temperature 1 \
    --seed 0 --max-tokens "$MAX_TOKENS" --max-num-seqs 256 2>&1 | tail -n 3 | tee "$WORK/distill_t1.log"
  "$PY" scripts/onpolicy_sets.py split "$DATA/all_t1.jsonl" "$DATA/prompts_t1.jsonl" "$DATA/onpolicy_t1.jsonl" \
    "$DATA/heldout_onpolicy_t1.jsonl"
  log "distill: done"
fi
tar -czf "$OUT/onpolicy_t1_v2.tar.gz" "$DATA/onpolicy_t1.jsonl" "$DATA/heldout_onpolicy_t1.jsonl"

log "train: start"
rc=0
timeout "$TRAIN_LIMIT" "$PY" -m idlm train configs/smollm2/idlm_v2.yaml "${model_args[@]}" --draft_loss "$DRAFT_LOSS" \
  --output_dir "$RUN" --eval_data "$DATA/heldout_onpolicy_t1.jsonl" --stages "$STAGES" --progress false \
  > "$WORK/train.log" 2>&1 || rc=$?
log "train: done (exit $rc)"
cp "$RUN/log.jsonl" "$WORK/train_log.jsonl" || true
CKPT=$RUN/final
if [ ! -f "$CKPT/COMPLETE" ]; then CKPT=$(ls -d "$RUN"/checkpoints/step-* 2>/dev/null | grep -v '\.tmp$' | tail -n 1); fi

if [ -n "$CKPT" ]; then
  log "eval: $CKPT"
  "$PY" scripts/compare_modes.py --model "$CKPT" --mode isd --prompts configs/smollm2/prompts/heldout.jsonl \
    --strides 4 --temperatures 0 1 --seed 0 --max-tokens "$MAX_TOKENS" --dtype float32 --kv-cache-tokens 65536 \
    -o "$WORK/idlm_v2_compare.json" > "$WORK/compare.log" 2>&1 &
  "$PY" -m idlm eval perplexity configs/smollm2/heldout_text.txt --model "$CKPT" -o "$WORK/ppl_idlm_v2.json" \
    > "$WORK/ppl.log" 2>&1 &
  "$PY" -m idlm eval perplexity configs/smollm2/heldout_text.txt "${model_args[@]}" -o "$WORK/ppl_base.json" \
    > "$WORK/ppl_base.log" 2>&1 &
  wait
  log "eval: done"
fi

"$PY" - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
load = lambda name: json.loads((work / name).read_text()) if (work / name).is_file() else None
records = [json.loads(l) for l in (work / "train_log.jsonl").read_text().splitlines()] if (work / "train_log.jsonl").is_file() else []
summary = {"steps": records[-1]["step"] if records else 0, "train_tokens": sum(r["tokens"] // 2 for r in records),
           "last": records[-1] if records else None}
evals = [r for r in records if "eval_acceptance" in r]
summary["heldout_expected_acceptance"] = evals[-1]["eval_acceptance"] if evals else None
cmp = load("idlm_v2_compare.json")
if cmp:
    for run in cmp["runs"]:
        key = "greedy" if run["temperature"] == 0 else "T1"
        summary[key] = {"tpf": run["tpf"], "acceptance": run["draft_acceptance"], "identical": run["identical"]}
ppl, base = load("ppl_idlm_v2.json"), load("ppl_base.json")
if ppl and base:
    summary["perplexity"] = ppl["summary"]["perplexity"]
    summary["perplexity_base"] = base["summary"]["perplexity"]
    summary["perplexity_change"] = ppl["summary"]["perplexity"] / base["summary"]["perplexity"] - 1
(out / "idlm_v2_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "last"}, indent=1))
EOF
log "all done"
cp "$OUT/timings.txt" "$WORK/"
tar -czf "$OUT/results_idlm_v2.tar.gz" -C "$OUT" work_idlm && rm -rf "$WORK"
ls -l "$OUT"
