#!/usr/bin/env bash
# Call W (issue 17, ~4.5 min): does a step without gated rows now carry a round's clean-row bits in plain bf16?
# Kernel check (gated_silu_mul without a gate == its gated call's clean rows), the interpreter test, then
# v7 in plain bf16 on 100 held-out chats three ways side by side: IDLM_WIDE_LORA=0 (two-weight path),
# IDLM_WIDE_UNGATED=0 (widened, ungated steps on the base weight: the code before this session), and the
# default (ungated steps run the wide GEMM and the same silu_mul kernel). Then ar's speed at C = 1 and 64 with
# IDLM_WIDE_UNGATED=0 and 1 alternating (the price of the 24 more columns an ar step multiplies).
# Carry [".carry/w1.sh", ".carry/gguf.last", ".whl"] after the c1.. chain.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 100 python3 benchmarks/check_triton_lora.py --json $OUT/w1_check_triton_lora.json > $OUT/w1_check_triton_lora.txt 2>&1
echo "check rc $?"; grep -a "checks passed\|FAIL" $OUT/w1_check_triton_lora.txt | head
(python3 -m pytest --version >/dev/null 2>&1 && TRITON_INTERPRET=1 timeout 100 python3 -m pytest -q -p no:cacheprovider \
  tests/test_triton_lora.py 2>&1 | tail -n 3) || echo "no pytest here"
date -u
for v in "wide0 IDLM_WIDE_LORA=0" "ungated0 IDLM_WIDE_UNGATED=0" "default IDLM_NOTHING=1"; do
  set -- $v
  env $2 timeout 200 python3 scripts/compare_modes.py --model $M --adapter $A --prompts configs/smollm2/prompts/heldout.jsonl \
    --limit 100 --strides 4 --max-tokens 256 --dtype bfloat16 -o $OUT/w1_bf16_$1.json > $OUT/w1_bf16_$1.log 2>&1 &
done
wait; date -u
for f in $OUT/w1_bf16_*.log; do echo "== $f"; tail -n 4 $f; done
for rep in 1 2; do for u in 0 1; do
  IDLM_WIDE_UNGATED=$u timeout 80 python3 -m idlm bench --model $M --adapter $A --workload $W --modes ar \
    --concurrency 1,64 --num-prompts 64 --max-num-seqs 64 --warmup full -o $OUT/w1_ar_ungated${u}_${rep}.json 2>&1 \
    | grep -a "^ar " | sed "s/^/ungated=$u rep $rep: /"
done; done
date -u
