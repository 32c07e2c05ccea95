"""On the GPU host's CPU (2 threads, pinned): the default's quantised path with bfloat16 activations (PyTorch's
int4 kernel; `auto` on AMX / AVX-512 BF16 CPUs) against float32 activations on idlm's kernels (group GEMM, row
ops, decoder stack), alternating in one process; ar and risd, batch 1 and 8, 64 tokens of one chat."""
import statistics
import sys
import time

import torch

from idlm import LLM, SamplingParams

torch.set_num_threads(2)
gguf, adapter = sys.argv[1], sys.argv[2]
llms = {d: LLM(gguf, adapter=adapter, device="cpu", dtype=d, progress=False) for d in ("bfloat16", "float32")}
print({d: (str(llm.engine.model.model.layers[0].mlp.down_proj.extra_repr()), llm.engine.model.cpu_stack is not None)
       for d, llm in llms.items()}, flush=True)
ids = llms["float32"].engine.chat_prompt([{"role": "user", "content": "Explain how a bicycle stays upright."}])
res = {d: {} for d in llms}
for mode in ("ar", "risd"):
    p = SamplingParams(mode=mode, temperature=0, max_tokens=64, ignore_eos=True)
    for batch in (1, 8):
        want = {d: [o.token_ids for o in llm.generate([ids] * batch, p)] for d, llm in llms.items()}
        for _ in range(4):
            for d, llm in llms.items():
                t = time.perf_counter()
                out = llm.generate([ids] * batch, p)
                res[d].setdefault(f"{mode} b{batch}", []).append(64 * batch / (time.perf_counter() - t))
                assert [o.token_ids for o in out] == want[d]
        print(mode, batch, {d: f"{statistics.median(v[f'{mode} b{batch}']):.1f}" for d, v in res.items()},
              flush=True)
greedy = {m: SamplingParams(mode=m, temperature=0, max_tokens=64) for m in ("ar", "risd")}
ar = {d: [o.token_ids for o in llm.generate([ids], greedy["ar"])] for d, llm in llms.items()}
rs = {d: [o.token_ids for o in llm.generate([ids], greedy["risd"])] for d, llm in llms.items()}
print("risd == ar:", {d: ar[d] == rs[d] for d in llms})
