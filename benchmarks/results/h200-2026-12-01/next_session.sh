#!/usr/bin/env bash
# The next GPU session's first real call, not yet run (after `bash scripts/gpu_stage.sh` here and the
# three copy calls there). Here: cp this file .carry/next_session.sh; git show 967a1b4:idlm/models/transformer.py
# > .carry/old_transformer.py (the finish kernel on gate_up too). Carry [".carry/next_session.sh",
# ".carry/gguf.part03", ".whl", ".carry/old_transformer.py"].
# 1) the code as committed: the kernels' check (the last one ran out of time after gate_up's first line) and
#    the engine check (the gate_up consumer ran in it only beside the o/down consumers since removed);
# 2) gate_up's consumer against the finish kernel, C = 64 with refills and C = 1, alternating processes;
# 3) why a K = 0 step of a risd run cost the stride policy 2.41 ms against an ar step's 2.0 at C = 64:
#    step kinds and kernels of ar and risd:adaptive with refills.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 150 python3 benchmarks/check_triton_lora.py --json $OUT/check_triton_lora.json > $OUT/check_triton_lora.txt 2>&1
grep -i "fail\|passed\|gate_up" $OUT/check_triton_lora.txt
timeout 110 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt; grep -c "equal" $OUT/engine_check.txt
grep "MISMATCH\|ALL GREEDY\|Error" $OUT/engine_check.txt | head
cp idlm/models/transformer.py /tmp/new_transformer.py
for round in 1 2; do
  for v in new old; do
    if [ $v = old ]; then cp .carry/old_transformer.py idlm/models/transformer.py; else cp /tmp/new_transformer.py idlm/models/transformer.py; fi
    date -u
    timeout 100 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
      --concurrency 64 --max-num-seqs 64 -o $OUT/ab_${v}_$round.json 2>&1 | grep "^ar \|^risd" | sed "s/^/$v $round: /"
  done
done
cp /tmp/new_transformer.py idlm/models/transformer.py
date -u
timeout 150 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --requests 256 \
  --modes ar,risd:adaptive --gpu-profile -o $OUT/breakdown_adaptive_c64.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_adaptive_c64.txt
grep -A3 "C=64\|GPU kernels" $OUT/breakdown_adaptive_c64.txt | head -30
date -u
