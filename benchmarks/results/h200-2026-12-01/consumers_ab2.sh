#!/usr/bin/env bash
# Call 4 of 2026-12-01 (after the three copy calls): carry [".carry/consumers_ab2.sh", ".carry/gguf.part03", ".whl",
# ".carry/old_transformer.py", ".carry/gateup_transformer.py"]: this file, HEAD~'s idlm/models/transformer.py (the
# finish kernel on every projection: "old") and the working tree's with o and down not deferred ("gateup": only
# gate_up's delta added by its consumer, silu_mul).
# 1) the kernels' check (bf16) and speed against the finish kernel + the compiled consumer; 2) the engine check;
# 3) A/B in alternating processes: old, gateup, new (o and down deltas added by the add + norm kernel, a few
# rows a program).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 90 python3 benchmarks/check_triton_lora.py --json $OUT/check_triton_lora.json 2>&1 | grep -v "^qwen3" | tee $OUT/check_triton_lora.txt | grep -i "fail\|passed\|smollm2 [od]\|gate_up"
date -u
timeout 110 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt; grep -c "equal" $OUT/engine_check.txt
grep "MISMATCH\|ALL GREEDY\|Error\|error" $OUT/engine_check.txt | head
cp idlm/models/transformer.py /tmp/new_transformer.py
modes=ar,risd
for round in 1 2; do
  variants="new old gateup"; [ $round = 2 ] && variants="new old"
  for v in $variants; do
    case $v in
      new) cp /tmp/new_transformer.py idlm/models/transformer.py;;
      old) cp .carry/old_transformer.py idlm/models/transformer.py;;
      gateup) cp .carry/gateup_transformer.py idlm/models/transformer.py;;
    esac
    date -u
    timeout 100 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes $modes --stride-policy fixed \
      --concurrency 64,1 --num-prompts 64 --max-num-seqs 64 -o $OUT/ab2_${v}_$round.json 2>&1 | grep "^ar \|^risd" | sed "s/^/$v $round: /"
    modes=risd
  done
done
cp /tmp/new_transformer.py idlm/models/transformer.py
date -u
