#!/usr/bin/env bash
# 2026-12-01 call C: the host's work of a step launched ahead cut (the round's integers made inside its graph,
# pinned buffers reused, unchanged sampling settings not re-sent) and one logits buffer for every decode graph.
# 1) exactness: gpu_engine_check; 2) A/B against the code before (1025f94, .carry/old_tree) in alternating
# processes at C = 1; then the new code at C = 64 (256 requests), fixed and adaptive; 3) the step costs
# measured up to 64 requests with the pool sized by default (ran out of memory in call B).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
PYTHONPATH=$PWD:/tmp/site timeout 110 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt
grep -c "equal" $OUT/engine_check.txt; grep "MISMATCH\|ALL GREEDY\|Error" $OUT/engine_check.txt | head
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
PYTHONPATH=$PWD:/tmp/site timeout 100 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W \
  --modes ar,risd --stride-policy fixed,adaptive --concurrency 64 --max-num-seqs 64 -o $OUT/bench_c64.json 2>&1 \
  | grep "^ar \|^risd"
date -u
PYTHONPATH=$PWD:/tmp/site timeout 150 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W \
  --concurrency 64 --requests 64 --modes risd:adaptive -o $OUT/breakdown_default_pool.json 2>&1 | grep -v "it/s\]" \
  > $OUT/breakdown_default_pool.txt
grep "C=64\|\[decode\|Error" $OUT/breakdown_default_pool.txt | head -20
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
date -u
