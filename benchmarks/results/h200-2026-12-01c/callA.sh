#!/usr/bin/env bash
# The next GPU session's first real call, not yet run. Here: `bash scripts/gpu_stage.sh`; cp this file
# .carry/next_session.sh; rm -rf .carry/old_tree && mkdir -p .carry/old_tree && git archive cf55807 idlm |
# tar -x -C .carry/old_tree && rm -rf .carry/old_tree/idlm/adapters (the code before the build kernels and the
# greedy round). Run .carry/c1.sh, c2.sh, c3.sh as before, then carry [".carry/next_session.sh",
# ".carry/gguf.part03", ".whl", ".carry/old_tree"].
# 1) exactness of edebe09 (a device-built step's rows and its round's integers from Triton kernels; greedy rounds
#    from argmax tokens): gpu_engine_check; 2) the launches of an ar step at C = 1 (433 before); 3) A/B against
#    cf55807 in alternating processes at C = 1; 4) a fresh engine's adaptive policy at C = 1 and 16 (call E: it
#    never left AR; since then looks last two steps and steps that captured a graph are not timed).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
PYTHONPATH=$PWD:/tmp/site timeout 120 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt
grep -c "equal" $OUT/engine_check.txt; grep "MISMATCH\|ALL GREEDY\|Error" $OUT/engine_check.txt | head
date -u
PYTHONPATH=$PWD:/tmp/site timeout 60 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W \
  --concurrency 1 --requests 2 --modes ar,risd:fixed --gpu-profile -o $OUT/breakdown_c1.json 2>&1 | grep -v "it/s\]" \
  > $OUT/breakdown_c1.txt
grep "C=1\|GPU kernels" $OUT/breakdown_c1.txt
for round in 1 2; do
  for v in new old; do
    if [ $v = old ]; then P=$PWD/.carry/old_tree:/tmp/site; else P=$PWD:/tmp/site; fi
    date -u
    PYTHONPATH=$P timeout 60 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
      --stride-policy fixed --concurrency 1 --num-prompts 16 --max-num-seqs 64 -o $OUT/ab_${v}_$round.json 2>&1 \
      | grep "^ar \|^risd" | sed "s/^/$v $round: /"
  done
done
date -u
PYTHONPATH=$PWD:/tmp/site timeout 90 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W \
  --modes ar,risd --stride-policy adaptive --concurrency 1,16 --num-prompts 16 --max-num-seqs 64 \
  -o $OUT/adaptive_c1_c16.json 2>&1 | grep "^ar \|^risd\|K chosen"
date -u
