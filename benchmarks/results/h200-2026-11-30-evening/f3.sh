#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/f3.sh", ".carry/gguf.part02", ".whl"]
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, extra args
  timeout $2 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    --overlap-scheduling off,on -o $OUT/bench_$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up" | tail -16 | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
date -u
bench c64_16 200 --concurrency 64,16 --max-num-seqs 64 --hf-baseline --warmup full
date -u
bench poisson 120 --concurrency 64 --num-prompts 64 --request-rate 40 --max-num-seqs 64
date -u
timeout 90 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --modes ar,risd:fixed \
  --overlap-scheduling --gpu-profile -o $OUT/breakdown_c64_overlap_prof.json 2>&1 | grep -v "it/s\]\|clean_up" | tail -50
date -u
head -6 $W > /tmp/w6.jsonl
timeout 90 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload /tmp/w6.jsonl --concurrency 1 --modes risd:fixed \
  --overlap-scheduling --gpu-profile -o $OUT/breakdown_c1_overlap_prof.json 2>&1 | grep -v "it/s\]\|clean_up" | tail -40
date -u
