#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/f4.sh", ".carry/gguf.part02", ".whl"]
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, timeout, extra args
  timeout $2 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
    --overlap-scheduling off,on -o $OUT/bench_$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -A12 "^mode\|Error" | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
date -u
bench c1_a 80 --stride-policy fixed --concurrency 1 --num-prompts 8 --warmup full
date -u
bench c1_b 80 --stride-policy fixed --concurrency 1 --num-prompts 8 --warmup full
date -u
bench c4 70 --stride-policy fixed --concurrency 4 --num-prompts 32 --max-num-seqs 4 --warmup full
date -u
bench c64_adaptive 100 --stride-policy adaptive --concurrency 64 --num-prompts 64 --max-num-seqs 64 --warmup full
date -u
