#!/usr/bin/env bash
# Issue 17: the three draft losses (ce, kl, tv) for the R-ISD adapter, same data and steps, on one
# GPU in one call (estimated 7-8 minutes on an H200: distill ~2, train ~3.5, eval ~1.5), then acceptance by
# draft position on held-out prompts.
#
#   OUT=/path/results MODEL=/tmp/smollm2.gguf bash scripts/gpu_loss_comparison.sh
#
# Stages, each timed in $OUT/timings.txt:
#   1. prompts: the first N_PROMPTS (default 3000) of configs/smollm2/prompts/v2/train.jsonl.gz (a
#      shuffled mix of every kind) and the 300 held-out prompts (heldout.jsonl, v2/heldout_code.jsonl,
#      v2/heldout_prose.jsonl); the base answers all of them greedily in ONE `idlm distill` call
#      (at most 256 tokens) -> data/smollm2-v2/onpolicy.jsonl and heldout_onpolicy.jsonl
#   2. train: configs/smollm2/risd_v2.yaml with --draft_loss ce, kl and tv, STEPS (120) steps of 16 rows
#      each, the three runs side by side on the GPU (PARALLEL=0: one after another); each under
#      `timeout TRAIN_LIMIT` (a run cut short keeps its newest 25-step checkpoint)
#   3. eval: scripts/compare_modes.py per adapter on the 100 held-out chat prompts, N = 4, no
#      branch drafts, float32: greedy (identical to ar? TPF, acceptance by position) and T = 1
#      (seeded per prompt: TPF, acceptance by position), the three side by side
#   4. summary: $OUT/$SUMMARY (loss_comparison.json unless set; + a table on stdout)
# What lands in $OUT (at most 8 files come back from a call, 16 MiB each):
#   loss_comparison.json  results.tar.gz (train logs, eval JSONs, distill log, timings)
#   adapter_best.tar (the adapter with the highest greedy TPF, 14 MiB)  onpolicy_v2.tar.gz
#   (the distilled answers, to carry into a later call instead of distilling again)  timings.txt
# Knobs: N_PROMPTS STEPS LOSSES ("ce kl tv") PARALLEL (1) TRAIN_LIMIT (s, 220) MAX_TOKENS (256) PY;
# VARIANTS compares other settings instead of the losses: "name=--key value ...;name2=..." (each a run of
# risd_v2.yaml with those overrides; values without spaces), e.g. a rank sweep (issue 17):
#   VARIANTS="r8=--lora_rank 8 --lora_alpha 16;r24=--lora_rank 24 --lora_alpha 48;attn48=--lora_rank 48
#   --lora_alpha 96 --lora_targets [q_proj,k_proj,v_proj,o_proj]" SUMMARY=rank_sweep.json (alpha = 2 x rank, as
#   the shipped adapter's; attention-only rank 48 is 10.6 MiB in bfloat16, all seven projections rank 24 14.0 MiB);
# for a CPU dry run of the plumbing: MODEL= (empty: the embedded default), HELDOUT_LIMIT (per file),
# TRAIN_ARGS (more --key value overrides, e.g. "--max_len 128 --micro_batch_size 1").
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
MODEL=${MODEL-/tmp/smollm2.gguf}
HELDOUT_LIMIT=${HELDOUT_LIMIT:-100}
TRAIN_ARGS=${TRAIN_ARGS:-}
PY=${PY:-python3}
N_PROMPTS=${N_PROMPTS:-3000}
STEPS=${STEPS:-120}
LOSSES=${LOSSES:-"ce kl tv"}
VARIANTS=${VARIANTS:-$(for l in $LOSSES; do printf '%s=--draft_loss %s;' "$l" "$l"; done)}
SUMMARY=${SUMMARY:-loss_comparison.json}
declare -A VARIANT_ARGS
NAMES=()
IFS=';' read -ra _entries <<< "$VARIANTS"
for _e in "${_entries[@]}"; do
  [ -n "$_e" ] || continue
  NAMES+=("${_e%%=*}")
  VARIANT_ARGS[${_e%%=*}]=${_e#*=}
done
PARALLEL=${PARALLEL:-1}
TRAIN_LIMIT=${TRAIN_LIMIT:-220}
MAX_TOKENS=${MAX_TOKENS:-256}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DATA=data/smollm2-v2
WORK=$OUT/work
mkdir -p "$OUT" "$WORK" "$DATA"
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi
T0=$SECONDS
log() { echo "== +$((SECONDS - T0)) s $(date +%H:%M:%S) $*" | tee -a "$OUT/timings.txt"; }
log "start: model=$MODEL n_prompts=$N_PROMPTS steps=$STEPS variants=$VARIANTS parallel=$PARALLEL"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/timings.txt"

# ---------------------------------------------------------------- 1. on-policy answers
if [ -s "$DATA/onpolicy.jsonl" ] && [ -s "$DATA/heldout_onpolicy.jsonl" ]; then
  log "distill: $DATA already holds the answers (carried or from an earlier call); skipped"
else
  "$PY" scripts/onpolicy_sets.py prompts "$N_PROMPTS" "$DATA/prompts.jsonl" --heldout-limit "$HELDOUT_LIMIT"
  log "distill: start"
  "$PY" -m idlm distill "$DATA/prompts.jsonl" "$DATA/all_onpolicy.jsonl" "${model_args[@]}" --mode ar \
    --temperature 0 --max-tokens "$MAX_TOKENS" --max-num-seqs 256 2>&1 | tail -n 3 | tee "$WORK/distill.log"
  "$PY" scripts/onpolicy_sets.py split "$DATA/all_onpolicy.jsonl" "$DATA/prompts.jsonl" "$DATA/onpolicy.jsonl" \
    "$DATA/heldout_onpolicy.jsonl"
  log "distill: done ($(wc -l < "$DATA/onpolicy.jsonl") training, $(wc -l < "$DATA/heldout_onpolicy.jsonl") held-out answers)"
fi
tar -czf "$OUT/onpolicy_v2.tar.gz" "$DATA/onpolicy.jsonl" "$DATA/heldout_onpolicy.jsonl"

# ---------------------------------------------------------------- 2. train
train_one() {  # NAME: risd_v2.yaml with that variant's overrides
  local t=$SECONDS rc=0
  # shellcheck disable=SC2086  # (the overrides and TRAIN_ARGS split into words on purpose)
  timeout "$TRAIN_LIMIT" "$PY" -m idlm train configs/smollm2/risd_v2.yaml "${model_args[@]}" ${VARIANT_ARGS[$1]} \
    --output_dir "runs/cmp-$1" --stages "[{stride: 4, steps: $STEPS}]" --progress false $TRAIN_ARGS \
    > "$WORK/train_$1.log" 2>&1 || rc=$?
  echo "$1 $((SECONDS - t)) $rc" >> "$WORK/train_times.txt"
}
log "train: start"
for name in "${NAMES[@]}"; do
  if [ "$PARALLEL" = 1 ]; then train_one "$name" & else train_one "$name"; fi
done
wait
log "train: done ($(tr '\n' ';' < "$WORK/train_times.txt"))"

adapter_of() {  # NAME -> the final adapter, or the newest checkpoint of a run cut short
  if [ -f "runs/cmp-$1/final/COMPLETE" ]; then echo "runs/cmp-$1/final"; else
    ls -d runs/cmp-"$1"/checkpoints/step-* 2>/dev/null | grep -v '\.tmp$' | tail -n 1; fi
}

# ---------------------------------------------------------------- 3. eval
log "eval: start"
for loss in "${NAMES[@]}"; do
  adapter=$(adapter_of "$loss")
  if [ -z "$adapter" ]; then echo "no adapter for $loss" | tee -a "$OUT/timings.txt"; continue; fi
  "$PY" scripts/compare_modes.py "${model_args[@]}" --adapter "$adapter" \
    --prompts configs/smollm2/prompts/heldout.jsonl --limit "$HELDOUT_LIMIT" --strides 4 --temperatures 0 1 --seed 0 --max-tokens "$MAX_TOKENS" --dtype float32 --kv-cache-tokens 65536 \
    -o "$WORK/eval_$loss.json" > "$WORK/eval_$loss.log" 2>&1 &
done
wait
log "eval: done"

# ---------------------------------------------------------------- 4. summary
"$PY" - "$WORK" "$OUT" "$SUMMARY" "${NAMES[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, out, summary_name, losses = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
times = {l.split()[0]: (int(l.split()[1]), int(l.split()[2])) for l in (work / "train_times.txt").read_text().split("\n") if l}
summary = {}
for loss in losses:
    log_path = Path(f"runs/cmp-{loss}/log.jsonl")
    records = [json.loads(l) for l in log_path.read_text().splitlines()] if log_path.is_file() else []
    evals = [r for r in records if "eval_acceptance" in r]
    entry = {"train_seconds": times.get(loss, (None,))[0], "train_exit": times.get(loss, (None, None))[1],
             "steps": records[-1]["step"] if records else 0,
             "train_tokens": sum(r["tokens"] // 2 for r in records),
             "train_acceptance_last10": [round(sum(r["acceptance"][j] for r in records[-10:]) / len(records[-10:]), 4)
                                         for j in range(3)] if records else None,
             "heldout_expected_acceptance": evals[-1]["eval_acceptance"] if evals else None}
    ev = work / f"eval_{loss}.json"
    if ev.is_file():
        r = json.loads(ev.read_text())
        for run in r["runs"]:
            key = "greedy" if run["temperature"] == 0 else f"T{run['temperature']:g}"
            entry[key] = {"tpf": round(run["tpf"], 4), "acceptance": [round(a, 4) for a in run["draft_acceptance"]],
                          "identical": run["identical"], "tokens": run["tokens"]}
        entry["ar_tpf"] = r["ar"]["tpf"]
    summary[loss] = entry
(out / summary_name).write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'run':<5}{'steps':>6}{'train s':>8}  {'greedy TPF':>10} {'acceptance':<18}{'T=1 TPF':>8} {'acceptance':<18}"
      f"identical  held-out E[acc] (teacher-forced)")
for loss, e in summary.items():
    g, t = e.get("greedy", {}), e.get("T1", {})
    acc = lambda x: " ".join(f"{a:.2f}" for a in x.get("acceptance", []))
    print(f"{loss:<5}{e['steps']:>6}{e['train_seconds'] or 0:>8}  {g.get('tpf', 0):>10.3f} {acc(g):<18}{t.get('tpf', 0):>8.3f} "
          f"{acc(t):<18}{str(g.get('identical')):>9}  {e['heldout_expected_acceptance']}")
best = max((l for l in summary if "greedy" in summary[l]), key=lambda l: summary[l]["greedy"]["tpf"], default=None)
(work / "best").write_text(best or "")
print(f"best by greedy TPF: {best}")
EOF
best=$(cat "$WORK/best")
if [ -n "$best" ]; then
  adapter=$(adapter_of "$best")
  tar -cf "$OUT/adapter_best.tar" -C "$adapter" --exclude trainer_state.pt --exclude COMPLETE . \
    && tar -rf "$OUT/adapter_best.tar" -C "runs/cmp-$best" log.jsonl
  echo "$best: $adapter" > "$WORK/adapter_best.txt"
fi
for loss in "${NAMES[@]}"; do cp "runs/cmp-$loss/log.jsonl" "$WORK/train_log_$loss.jsonl" 2>/dev/null || true; done
cp "$OUT/timings.txt" "$WORK/"
log "all done"
cp "$OUT/timings.txt" "$WORK/"
tar -czf "$OUT/results.tar.gz" -C "$OUT" work && rm -rf "$WORK"
ls -l "$OUT"
