#!/usr/bin/env bash
# Call 3 of 2026-12-01 (after the three copy calls): carry [".carry/consumers_ab.sh", ".carry/gguf.part03", ".whl",
# ".carry/old_transformer.py"], a copy of this file in .carry/ and HEAD~'s idlm/models/transformer.py (the
# finish kernel on every projection) as .carry/old_transformer.py.
# 1) the kernels' check (bf16 on the GPU) and speed; 2) the engine check with the fused consumers (o, gate_up
# and down deltas added by the kernel after them); 3) A/B: fused consumers (new) against the finish kernel
# on every projection (old), alternating processes, ar in each as the baseline.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 100 python3 benchmarks/check_triton_lora.py --json $OUT/check_triton_lora.json 2>&1 | grep -v "^qwen3" | tee $OUT/check_triton_lora.txt | grep -i "fail\|passed\|smollm2"
date -u
timeout 130 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt; grep -c "equal" $OUT/engine_check.txt
grep "MISMATCH\|ALL GREEDY\|Error\|error" $OUT/engine_check.txt | head
cp idlm/models/transformer.py /tmp/new_transformer.py
for round in 1 2; do
  for v in new old; do
    if [ $v = old ]; then cp .carry/old_transformer.py idlm/models/transformer.py; else cp /tmp/new_transformer.py idlm/models/transformer.py; fi
    date -u
    timeout 110 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
      --concurrency 64,1 --num-prompts 64 --max-num-seqs 64 -o $OUT/ab_${v}_$round.json 2>&1 | grep "^ar \|^risd" | sed "s/^/$v $round: /"
  done
done
cp /tmp/new_transformer.py idlm/models/transformer.py
date -u
