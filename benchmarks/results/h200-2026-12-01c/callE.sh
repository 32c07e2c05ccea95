#!/usr/bin/env bash
# Does an engine slow down run after run (ar admit8 ran 0.74x ar admit0 with the same schedule, after it)?
# admit 0,8,0,8 alternating on one engine, ar and risd fixed at C = 64, with Python's GC time per run.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 300 python3 .carry/aging.py bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed --concurrency 64 --num-prompts 256 --max-num-seqs 64 --admit-wait-steps 0,8,0,8 \
  -o $OUT/aging.json 2>&1 | grep "aging\|^ar \|^risd"
date -u
