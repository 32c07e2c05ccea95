#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/next_c.sh", ".carry/gguf.part02", ".whl"]
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, timeout, extra args
  timeout $2 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    -o $OUT/bench_$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -v "^\[bench\]\|wrote\|loading weights" | tail -4 | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
git log --oneline | head -1; date -u
timeout 110 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" | tee $OUT/engine_check.txt | grep -c "40/40"
tail -3 $OUT/engine_check.txt; date -u
for r in 1 2; do
  bench c1_default_$r 40 --concurrency 1 --num-prompts 8
  IDLM_FUSED_ROPE_KV=1 bench c1_rope_$r 40 --concurrency 1 --num-prompts 8
done
date -u
for r in 1 2; do
  bench c64_default_$r 60 --concurrency 64 --num-prompts 128 --max-num-seqs 64
  IDLM_FUSED_ROPE_KV=1 bench c64_rope_$r 60 --concurrency 64 --num-prompts 128 --max-num-seqs 64
done
date -u
head -6 $W > /tmp/w6.jsonl
timeout 60 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload /tmp/w6.jsonl --concurrency 1 --modes ar,risd:fixed \
  --gpu-profile -o $OUT/breakdown_c1.json 2>&1 | grep -v "it/s\]\|clean_up\|loading weights" | tail -60
date -u
