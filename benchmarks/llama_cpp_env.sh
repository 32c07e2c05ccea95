#!/usr/bin/env bash
# Builds llama-cpp-python from its sdist into a benchmark-only venv (.bench-venv/llama-cpp, git-ignored)
# for the llama.cpp baseline of benchmarks/cpu_default.py. Never an idlm dependency.
# About 12 minutes on 2 cores; run it once, e.g. `nice -n 19 bash benchmarks/llama_cpp_env.sh`.
# GGML_NATIVE=ON tunes for this CPU; on AMX Xeons that build crashed in batched prompt evaluation,
# so cpu_default.py evaluates prompts with n_batch=1 unless told otherwise (--llama-n-batch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.bench-venv/llama-cpp
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=ON}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$venv/bin/python" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$version"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $venv')"
