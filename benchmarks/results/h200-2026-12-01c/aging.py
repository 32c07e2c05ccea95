"""Does an engine slow down run after run? ar at C = 64, the same closed loop several times on one engine
(--admit-wait-steps 0,8,0,8: the values alternate), with the time Python's cyclic GC took in each run."""
import gc
import sys
import time

import idlm.bench.suite as suite

gc_time = [0.0, 0]
started = {}


def on_gc(phase, info):
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        gc_time[0] += time.perf_counter() - started["t"]
        gc_time[1] += info["generation"] == 2


gc.callbacks.append(on_gc)
closed = suite.run_closed_loop


def timed_closed_loop(engine, requests, c, params, roofline):
    before, t = list(gc_time), time.perf_counter()
    out = closed(engine, requests, c, params, roofline)
    wall = time.perf_counter() - t
    print(f"[aging] {params.mode} C={c} n={len(requests)} {out['output_tok_s']:.0f} tok/s, wall {wall:.2f} s,"
          f" gc {gc_time[0] - before[0]:.3f} s ({gc_time[1] - before[1]} gen-2), objects {len(gc.get_objects())}",
          flush=True)
    return out


suite.run_closed_loop = timed_closed_loop
from idlm.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
