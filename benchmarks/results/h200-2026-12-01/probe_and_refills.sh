#!/usr/bin/env bash
# Call 2 of 2026-12-01 (after the three copy calls): carry [".carry/probe_and_refills.sh",
# ".carry/gguf.part03", ".whl"], a copy of this file in .carry/.
# 1) the gated LoRA finish kernel and variants at SmolLM2's decode shapes (probe_lora_finish.py);
# 2) where a step goes at C = 64 with refills (256 requests, newcomers as requests finish), by kind and kernel;
# 3) which round shape pays at C = 64: risd N = 2, 3, 4, with and without branches, against ar.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
date -u
timeout 150 python3 benchmarks/probe_lora_finish.py --json $OUT/probe_lora_finish.json 2>&1 | tee $OUT/probe_lora_finish.txt
date -u
timeout 170 python3 benchmarks/step_breakdown.py --model $M --adapter $A --workload $W --concurrency 64 --requests 256 \
  --modes ar,risd:fixed --gpu-profile -o $OUT/breakdown_refills_c64.json 2>&1 | grep -v "it/s\]" > $OUT/breakdown_refills_c64.txt
grep -A3 "C=64\|GPU kernels" $OUT/breakdown_refills_c64.txt | head -40
date -u
timeout 150 python3 -m idlm bench --model $M --adapter $A --stride 2,3,4 --branches 0 --workload $W --modes ar,risd \
  --stride-policy fixed --concurrency 64 --max-num-seqs 64 -o $OUT/bench_shapes_nobranch.json 2>&1 | grep -v "it/s\]\|clean_up\|dequantis\|loading" | tail -6
date -u
