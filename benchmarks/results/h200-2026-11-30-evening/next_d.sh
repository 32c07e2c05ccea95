#!/usr/bin/env bash
# next session, third call of the GGUF chain (.carry/c1.sh, .carry/gpu2.sh first): carry [".carry/next_d.sh", ".carry/gguf.part02", ".whl"]
# overlap scheduling off and on, alternating on one engine, on real weights; then where a C = 64 step goes with it on
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, extra args
  timeout 170 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    --overlap-scheduling off,on -o $OUT/bench_$1.json "${@:2}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -A12 "^mode" | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
git log --oneline | head -1; date -u
bench c64_16 --concurrency 64,16 --max-num-seqs 64 --hf-baseline --warmup full
date -u
bench c1 --concurrency 1 --num-prompts 8 --warmup full
date -u
timeout 120 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --modes ar,risd:fixed \
  --overlap-scheduling -o $OUT/breakdown_c64_overlap.json 2>&1 | grep -v "it/s\]\|clean_up" | tail -30
date -u
