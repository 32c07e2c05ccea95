#!/usr/bin/env bash
# third call of the GGUF chain: carry [".carry/next_b.sh", ".carry/gguf.part02", ".whl"]
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 .carry/gguf.part02 > /tmp/smollm2.gguf; sha256sum /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
bench() {  # label, timeout, extra args
  timeout $2 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd --stride-policy fixed \
    -o $OUT/bench_$1.json "${@:3}" 2>&1 | grep -v "it/s\]\|clean_up" | grep -v "^\[bench\]\|wrote" | tail -6 | sed "s/^/$1 /" | tee -a $OUT/bench.txt
}
git log --oneline | head -1; date -u
for r in 1 2; do
  bench c64_default_$r 75 --concurrency 64 --num-prompts 128 --max-num-seqs 64
  IDLM_GRAPHED_BUILD=1 bench c64_graphed_$r 75 --concurrency 64 --num-prompts 128 --max-num-seqs 64
  IDLM_FUSED_ROPE_KV=1 bench c64_rope_$r 75 --concurrency 64 --num-prompts 128 --max-num-seqs 64
  date -u
done
bench c1_default 50 --concurrency 1 --num-prompts 8
IDLM_GRAPHED_BUILD=1 bench c1_graphed 50 --concurrency 1 --num-prompts 8
IDLM_FUSED_ROPE_KV=1 bench c1_rope 50 --concurrency 1 --num-prompts 8
date -u
python3 - <<'PY'
import json
lines = [json.loads(l) for l in open("configs/smollm2/prompts/bench_workload.jsonl")]
with open("/tmp/mixed.jsonl", "w") as f:
    for i, l in enumerate(lines):
        l["max_tokens"] = 64 + (i * 97) % 385
        f.write(json.dumps(l) + "\n")
PY
W=/tmp/mixed.jsonl; bench c64_mixed 150 --concurrency 64 --num-prompts 256 --max-num-seqs 64 --hf-baseline
date -u
