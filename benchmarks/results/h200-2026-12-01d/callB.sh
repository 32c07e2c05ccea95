#!/usr/bin/env bash
# Issue 17, call B: the base answers the v2 prompts greedily (reproduce_smollm2.sh stage v2-distill, shards of
# 5,000, 512 requests at once) for at most ~520 s; the finished shards come back gzipped (and stay in data/ on a
# warm machine for call C). Carry [".carry/callB.sh", ".carry/gguf.part03", ".whl"] after the c1-c3 chain.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
date -u
OUT=$OUT/distill MODEL=/tmp/smollm2.gguf STAGES=v2-distill SHARD=5000 DISTILL_SEQS=512 PY=python3 \
  timeout 520 bash scripts/reproduce_smollm2.sh > $OUT/distill_stage.log 2>&1
echo "stage rc $?"; date -u
tail -c 3000 $OUT/distill_stage.log | tr '\r' '\n' | tail -n 8
ls -la data/smollm2-v2/shards/ | tee $OUT/shards.txt
for a in data/smollm2-v2/shards/answers_*.jsonl; do gzip -c "$a" > $OUT/$(basename "$a").gz; done
cp -r data/smollm2-v2/shards /tmp/v2shards  # a second copy outside the tree, for call C
wc -l data/smollm2-v2/shards/answers_*.jsonl
