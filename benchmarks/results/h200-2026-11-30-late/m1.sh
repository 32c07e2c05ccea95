#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/m1.sh", ".carry/gguf.part02", ".whl"]
# A/B eager-built vs graph-built device steps, alternating in one call; then Poisson arrivals at C <= 64
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # C, label, extra args
  timeout 100 python3 -m idlm bench --model $M --adapter $A --stride 4 --concurrency $1 --workload $W \
    -o $OUT/bench_$2_c$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -A5 "^mode" | sed "s/^/$2 /" | tee -a $OUT/bench.txt
}
git log --oneline | head -1; date -u
for rep in 1 2; do
  bench 1 eager$rep --modes ar,risd --stride-policy fixed
  IDLM_GRAPHED_BUILD=1 bench 1 graphed$rep --modes ar,risd --stride-policy fixed
done
date -u
for rep in 1 2; do
  bench 64 eager$rep --modes ar,risd --stride-policy fixed
  IDLM_GRAPHED_BUILD=1 bench 64 graphed$rep --modes ar,risd --stride-policy fixed
done
date -u
bench 64 poisson40 --modes ar,risd --stride-policy fixed --max-num-seqs 64 --num-prompts 256 --request-rate 40
date -u
