"""Scaling curve: acceptance by draft position against training tokens (log scale), from `idlm train`
logs (log.jsonl), for any number of runs (the adapter's losses, the conversion, ...).

    python scripts/plot_scaling.py ce=runs/cmp-ce/log.jsonl kl=runs/cmp-kl/log.jsonl tv=runs/cmp-tv/log.jsonl \
        --eval ce=eval_ce.json --eval kl=eval_kl.json -o benchmarks/results/scaling_risd

Per run, the x axis is the training data read so far: the tokens of the clean half of each step
(`tokens` / 2 in the log), summed. Two kinds of points:
- held-out (solid, markers): `eval_acceptance`, logged every eval_every steps when the config has
  eval_data: the expected acceptance sum(min(p, q)) of the MASK rows on held-out on-policy answers,
  teacher-forced (every MASK sees the true prefix), by draft position;
- training (dotted): the same quantity on the training batches (`acceptance`), averaged in
  log-spaced bins of tokens.
--eval adds the measured decoding acceptance by position (scripts/compare_modes.py JSON, greedy
and T = 1 runs) at the run's final token count, as stars (greedy) and crosses (T = 1).
Writes OUT.png and OUT.json.
"""

import argparse
import json
import math
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def curve(records: list[dict], bins_per_decade: int = 6) -> dict:
    tokens, held_out, train = 0, [], []
    for r in records:
        tokens += r["tokens"] // 2
        if r.get("eval_acceptance"):
            held_out.append({"step": r["step"], "tokens": tokens, "acceptance": r["eval_acceptance"],
                             "mean": r.get("eval_acceptance_mean")})
        if r.get("acceptance"):
            train.append((tokens, r["acceptance"]))
    binned = []
    if train:
        lo = math.floor(math.log10(train[0][0]) * bins_per_decade)
        groups: dict[int, list] = {}
        for t, acc in train:
            groups.setdefault(math.floor(math.log10(t) * bins_per_decade) - lo, []).append((t, acc))
        for _, group in sorted(groups.items()):
            width = max(len(a) for _, a in group)
            mean = [sum(a[j] for _, a in group if j < len(a) and a[j] is not None) /
                    max(1, sum(1 for _, a in group if j < len(a) and a[j] is not None)) for j in range(width)]
            binned.append({"tokens": round(math.exp(sum(math.log(t) for t, _ in group) / len(group))),
                           "steps": len(group), "acceptance": [round(m, 4) for m in mean]})
    return {"final_tokens": tokens, "steps": records[-1]["step"] if records else 0, "held_out": held_out,
            "train_binned": binned}


def decoding_points(path: Path) -> dict:
    result = json.loads(path.read_text())
    out = {}
    for run in result["runs"]:
        key = "greedy" if run.get("temperature", 0) == 0 else f"T{run['temperature']:g}"
        out[key] = {"stride": run["stride"], "tpf": run["tpf"], "acceptance": run["draft_acceptance"]}
    return out


def labelled(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        label, _, path = item.rpartition("=")
        out.append((label or Path(path).parent.name, Path(path)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="LABEL=path/to/log.jsonl (or a path: labelled by its folder)")
    ap.add_argument("--eval", action="append", default=[], help="LABEL=compare_modes.json for a run's decoding")
    ap.add_argument("--output", "-o", required=True, help="OUT: writes OUT.png and OUT.json")
    ap.add_argument("--title", default="acceptance by draft position against training tokens")
    args = ap.parse_args()

    runs = {label: curve(read_log(path)) for label, path in labelled(args.logs)}
    for label, path in labelled(args.eval):
        runs.setdefault(label, {"final_tokens": None, "held_out": [], "train_binned": []})["decoding"] = \
            decoding_points(path)
    positions = max([len(p["acceptance"]) for r in runs.values() for p in r["held_out"] + r["train_binned"]]
                    + [len(d["acceptance"]) for r in runs.values() for d in r.get("decoding", {}).values()] + [1])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # the legend goes under the plots: with more than two runs it would cover a panel
    legend_rows = math.ceil(sum(1 + bool(r["train_binned"]) + len(r.get("decoding", {})) for r in runs.values()) / 3)
    height = 4 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, positions, figsize=(4.2 * positions, height), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, ax in enumerate(axes[0]):
        for i, (label, run) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            pts = [(p["tokens"], p["acceptance"][j]) for p in run["held_out"] if j < len(p["acceptance"])]
            if pts:
                ax.plot(*zip(*pts), "-o", color=color, label=f"{label} held-out", markersize=3)
            pts = [(p["tokens"], p["acceptance"][j]) for p in run["train_binned"] if j < len(p["acceptance"])]
            if pts:
                ax.plot(*zip(*pts), ":", color=color, label=f"{label} train", alpha=0.8)
            for key, marker in (("greedy", "*"), ("T1", "x")):
                d = run.get("decoding", {}).get(key)
                if d and j < len(d["acceptance"]) and run["final_tokens"]:
                    ax.plot([run["final_tokens"]], [d["acceptance"][j]], marker, color=color, markersize=10,
                            label=f"{label} decoding {'greedy' if key == 'greedy' else 'T = 1'}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training tokens read (clean half)")
        ax.set_title(f"draft position {j + 1}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("acceptance")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(args.title)
    fig.tight_layout(rect=(0, 0.2 * legend_rows / height + 0.02, 1, 1))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
