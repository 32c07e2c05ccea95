"""Benchmark results as a table, a JSON file and a throughput-vs-latency plot."""

import json
from pathlib import Path

DEFINITIONS = {
    "output_tok_s": "output tokens of all requests / wall time from the first request added to the last finished",
    "per_request_tok_s": "mean over requests of output tokens / latency (added -> last token, TTFT included)",
    "per_request_decode_tok_s": "mean over requests of (output tokens - 1) / (last token - first token)",
    "ttft_s": "request added -> the engine step that returned its first token (queueing and prefill included)",
    "itl_s": "per output token after the first: the gap since the request's previous output divided by the "
             "tokens that output carried (an ISD round returns several tokens at once)",
    "tbt_s": "time between outputs: the gaps between a request's outputs, whatever each carried (a round's "
             "tokens arrive together, so at several tokens per forward ITL's median falls below a step while "
             "this one's does not)",
    "tokens_per_forward": "output tokens / forwards each request took part in (prefill included), engine stats",
    "step_cost": "the adaptive stride's price list: decode-step seconds measured at start per batch size and rows "
                 "per request (dummy requests, the runner's whole path), the last steps that ran "
                 "(batch x rows: seconds), whose median it uses",
    "chosen_k": "adaptive stride: decode steps of the run by the K (drafts a round) the policy chose (0 = AR steps)",
    "priced_round_gain": "adaptive stride: by batch size, the mean over the run's choices of the best round's expected "
                         "tokens per second over an AR step's, as the policy priced them (before its margin); set "
                         "beside the fixed stride's measured rate over ar's to see what a step's price leaves out",
    "decode_shapes": "decode steps by shape, 'requests x rows' (rows: the most any request fed; x1 = AR steps), "
                     "most frequent first: [steps, mean seconds]",
    "branch_rounds": "verify rounds that tested drafts a branch proposed (after a rejection, instead of a cold round)",
    "decode_steps_launched_ahead": "decode steps launched before the outcome of the step before was read (overlap "
                                   "scheduling); the rest of decode_steps waited for it (a plan changed, a request "
                                   "joined or left)",
    "decode_step_s_mean": "mean wall time of engine.step() over steps with no prefill, from the call to its return "
                          "(with --sync-steps the device synchronised before and after each)",
    "roofline_fraction": "sum over decode steps of the floor / their measured time; floor = max((weight bytes + "
                         "KV bytes read) / peak bandwidth, FLOPs / peak matmul rate), KV bytes = sum over the "
                         "batch of (cached + fed tokens) * 2 * layers * kv_heads * head_dim * element bytes",
    "request_rate": "open-loop runs: requests arrive at Poisson times at this mean rate (requests/s), however "
                    "many are in flight (the engine queues what it cannot take); TTFT counts from the scheduled "
                    "arrival, output_tok_s over the wall time from the start to the last finished",
    "peak_memory_bytes": "torch.cuda.max_memory_allocated during the timed run (weights and KV pool included)",
    "hf": "transformers generate, greedy, one static left-padded batch of C prompts, min_new_tokens = "
          "max_new_tokens; per-request tok/s = new tokens / the call's wall time",
}

COLUMNS = ("mode", "C", "reqs", "tok/s", "req tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "TPF", "step ms",
           "roofline", "mem GiB")


def _ms(a: float | None, b: float | None = None) -> str:
    if a is None:
        return "-"
    return f"{a * 1e3:.1f}" if b is None else f"{a * 1e3:.1f}/{b * 1e3:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in result["results"]:
        mem = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] is not None else None
        load = str(r["concurrency"]) if r["concurrency"] is not None else f"{r['request_rate']:g}/s"
        rows.append((r["mode"], load, str(r["num_requests"]), f"{r['output_tok_s']:.1f}",
                     f"{r['per_request_tok_s']:.1f}", _ms(r["ttft_s_p50"], r["ttft_s_p99"]),
                     _ms(r["itl_s_p50"], r["itl_s_p99"]), _num(r["tokens_per_forward"], ".2f"),
                     _ms(r["decode_step_s_mean"]), _num(r["roofline_fraction"], ".2f"), _num(mem, ".1f")))
    for r in result.get("hf_baseline") or []:
        mem = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] is not None else None
        rows.append(("hf", str(r["batch_size"]), str(r["batch_size"]), f"{r['output_tok_s']:.1f}",
                     f"{r['per_request_tok_s']:.1f}", "-", "-", "1.00", "-", "-", _num(mem, ".1f")))
    return rows


def format_table(result: dict) -> str:
    rows = [COLUMNS, *table_rows(result)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"idlm bench: {result['model']} on {result['device']} ({result['dtype']}), torch {result['torch']}",
             f"workload: {result['workload']['description']}"]
    lines += ["  ".join(cell.rjust(w) if i > 0 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    try:
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror or e})") from e


def curves(result: dict) -> dict[str, list[tuple[int, float, float]]]:
    """Per mode (and hf): (C, per-request tok/s, total tok/s) points, by increasing C."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for r in result["results"]:
        if r["concurrency"] is not None:  # open-loop runs have no C to place them by
            out.setdefault(r["mode"], []).append((r["concurrency"], r["per_request_tok_s"], r["output_tok_s"]))
    for r in result.get("hf_baseline") or []:
        out.setdefault("hf", []).append((r["batch_size"], r["per_request_tok_s"], r["output_tok_s"]))
    return {mode: sorted(points) for mode, points in out.items()}


def write_plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for mode, points in curves(result).items():
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        ax.plot(xs, ys, marker="o", label=mode)
        for c, x, y in points:
            ax.annotate(f"C={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("per-request output tokens/s")
    ax.set_ylabel("total output tokens/s")
    ax.set_title(f"{result['model']} on {result['device']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror or e})") from e
    finally:
        plt.close(fig)
