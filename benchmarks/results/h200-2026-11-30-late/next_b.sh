#!/usr/bin/env bash
# next session, third call of the GGUF chain: carry [".carry/next_b.sh", ".carry/gguf.part02", ".whl"]
# widened LoRA vs IDLM_WIDE_LORA=0 at C = 16 and 64 with 4C prompts (refilled closed loop), ar + risd fixed + adaptive
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf && sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # C, label, extra args
  timeout 130 python3 -m idlm bench --model $M --adapter $A --stride 4 --concurrency $1 --workload $W --num-prompts $(( 4 * $1 )) \
    -o $OUT/bench_$2_c$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -A5 "^mode" | sed "s/^/$2 /" | tee -a $OUT/bench.txt
}
for C in 64 16; do
  bench $C wide --modes ar,risd --stride-policy fixed,adaptive --hf-baseline
  IDLM_GRAPHED_BUILD=1 bench $C graphedbuild --modes ar,risd --stride-policy fixed
  date -u
done
IDLM_GRAPHED_BUILD=1 bench 1 graphedbuild --modes ar,risd --stride-policy fixed
bench 1 wide --modes ar,risd --stride-policy fixed
date -u
for C in 64 16; do IDLM_WIDE_LORA=0 bench $C twoweight --modes ar,risd --stride-policy fixed; done
