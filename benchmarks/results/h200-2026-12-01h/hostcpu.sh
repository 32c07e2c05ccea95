#!/usr/bin/env bash
# Call HC (issue 16): the GPU host's CPU, 2 pinned threads: bfloat16 activations on PyTorch's int4 kernel (what
# `auto` picks on AMX / AVX-512 BF16 CPUs) against float32 on idlm's kernels. Carry [".carry/hostcpu.sh",
# ".carry/hostcpu.py", ".carry/gguf.last", ".whl"] after the c1.. chain.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache OMP_NUM_THREADS=2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
export PYTHONPATH=$PWD:/tmp/site
lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -w "amx_tile\|avx512_bf16\|avx512_vnni\|avx_vnni" /proc/cpuinfo | sort | uniq -c
python3 -c "import torch; print(torch.backends.cpu.get_cpu_capability())"
date -u
timeout 420 taskset -c 0,1 python3 .carry/hostcpu.py /tmp/smollm2.gguf idlm/adapters/smollm2-risd 2>&1 | grep -v "it/s\]" | tee $OUT/hostcpu.txt | tail -20
date -u
