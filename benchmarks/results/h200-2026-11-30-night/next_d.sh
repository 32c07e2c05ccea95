#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/next_d.sh", ".carry/gguf.part02", ".whl"]
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, timeout, extra args
  timeout $2 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    -o $OUT/bench_$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up\|dequantising\|loading weights" | tail -14 | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
git log --oneline | head -1; date -u
timeout 100 python3 benchmarks/gpu_engine_check.py 2>&1 | grep -v "it/s\]" > $OUT/engine_check.txt; grep -c "40/40" $OUT/engine_check.txt; tail -1 $OUT/engine_check.txt
date -u
bench c1 45 --concurrency 1 --num-prompts 8
bench c4 45 --concurrency 4 --num-prompts 16
date -u
bench c64_16 170 --concurrency 64,16 --max-num-seqs 64 --hf-baseline
date -u
python3 - <<'PY'
import json
lines = [json.loads(l) for l in open("configs/smollm2/prompts/bench_workload.jsonl")]
with open("/tmp/mixed.jsonl", "w") as f:
    for i, l in enumerate(lines):
        l["max_tokens"] = 64 + (i * 97) % 385
        f.write(json.dumps(l) + "\n")
PY
W=/tmp/mixed.jsonl; bench c64_mixed 60 --concurrency 64 --num-prompts 256 --max-num-seqs 64
W=$PWD/configs/smollm2/prompts/bench_workload.jsonl; bench poisson 60 --concurrency 64 --num-prompts 64 --request-rate 40 --max-num-seqs 64
date -u
