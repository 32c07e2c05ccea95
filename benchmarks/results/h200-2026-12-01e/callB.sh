#!/usr/bin/env bash
# Next session, call 2 (issue 17, ~6-8 min; not yet run): the base answers the other six shards of the v2
# prompts (reproduce_smollm2.sh v2-distill; shards 00-05 come from this session's gzipped answers, which
# are tracked files, so the stage skips them). The new shards come back gzipped and stay in data/ for
# call 3. Carry [".carry/next_b.sh", ".carry/gguf.last", ".whl"] (right after call 1, while warm).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
S=data/smollm2-v2/shards; mkdir -p $S
for g in benchmarks/results/h200-2026-12-01d/v2answers/answers_*.jsonl.gz; do gunzip -c "$g" > $S/$(basename "$g" .gz); done
date -u
OUT=$OUT/distill MODEL=/tmp/smollm2.gguf STAGES=v2-distill SHARD=5000 DISTILL_SEQS=512 PY=python3 \
  timeout 530 bash scripts/reproduce_smollm2.sh > $OUT/distill_stage.log 2>&1
echo "stage rc $?"; date -u
wc -l $S/answers_*.jsonl
for a in $S/answers_0[6-9].jsonl $S/answers_1*.jsonl; do [ -s "$a" ] && gzip -c "$a" > $OUT/$(basename "$a").gz; done
mkdir -p /tmp/v2shards && cp $S/answers_*.jsonl /tmp/v2shards/
