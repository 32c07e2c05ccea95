"""llama.cpp's side of benchmarks/cpu_default.py, run by the benchmark venv's Python
(benchmarks/llama_cpp_env.sh): greedy answers to prompts given as token ids, one sequence at a
time, timed per prompt (prompt evaluation included). Reads a JSON request on stdin, prints JSON.

    {"model": "x.gguf", "prompts": [[1, 2, ...], ...], "max_tokens": 128, "threads": 2,
     "n_batch": 1, "eos": [2], "repeats": 1}
"""

import json
import sys
import time

from llama_cpp import Llama


def main() -> None:
    req = json.load(sys.stdin)
    llm = Llama(req["model"], n_ctx=2048, n_threads=req["threads"], n_threads_batch=req["threads"],
                n_batch=req["n_batch"], verbose=False)
    eos = set(req["eos"])
    llm.reset()
    list(zip(range(4), llm.generate(req["prompts"][0], top_k=1, temp=0.0, repeat_penalty=1.0)))
    runs = []
    for _ in range(req.get("repeats", 1)):
        outputs, seconds = [], []
        for ids in req["prompts"]:
            llm.reset()  # no KV reuse between prompts
            t = time.perf_counter()
            out = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(token)
                if token in eos or len(out) == req["max_tokens"]:
                    break
            seconds.append(time.perf_counter() - t)
            outputs.append(out)
        runs.append(dict(outputs=outputs, seconds=seconds))
    json.dump(dict(runs=runs), sys.stdout)


if __name__ == "__main__":
    main()
