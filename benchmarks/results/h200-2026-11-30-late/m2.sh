#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/m2.sh", ".carry/gguf.part02", ".whl"]
# the same closed loop twice in one engine: the second run meets no shape for the first time
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, extra args
  timeout 150 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    -o $OUT/bench_$1.json "${@:2}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -A9 "^mode" | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
git log --oneline | head -1; date -u
bench twice_c64_16 --concurrency 64,64,16,16 --max-num-seqs 64
date -u
bench twice_c1 --concurrency 1,1 --num-prompts 8
date -u
