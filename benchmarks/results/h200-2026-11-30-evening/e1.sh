#!/usr/bin/env bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 250 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    --overlap-scheduling off,on -o $OUT/bench_c64_16.json --concurrency 64,16 --max-num-seqs 64 --warmup full 2>&1 | grep -v "it/s\]\|clean_up" | tail -30
date -u
