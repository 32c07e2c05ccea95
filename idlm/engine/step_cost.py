"""What a decode step costs on this device, by batch size and rows per request (the adaptive
stride's price list, docs/ARCHITECTURE.md "Adaptive stride").

Two sources, the second trusted over the first:
- a table measured the first time the policy asks about a batch near a batch size: real decode
  steps (the runner's whole path: inputs, forward, the round) of dummy requests whose KV goes to
  the scratch block only, so live requests are untouched. It has the right shape (what more rows
  cost) but not the right scale: dummy requests have short contexts and no engine work around
  the runner (outputs, stop strings), and a cold GPU clocks low.
- the steps that ran, each timed from its start to the next step's start (so the scheduling,
  the round's bookkeeping and the caller's work on the outputs count, which grow with the tokens a
  step commits): per (batch size, rows per request), the median of the last
  few once a shape has been seen a few times (a median, because a step that captures a CUDA
  graph or compiles a kernel takes 10-100 times as long); for shapes not seen, the table times
  the ratio seen / table at that batch size, interpolated in rows between the seen shapes around
  it, or taken from the nearest batch size that has seen steps. A ratio, not a difference: the
  table's steps are built on the host and synchronous, so on a GPU they cost a millisecond or more
  beyond a real step (2.95 ms against 1.85 at 64 requests on an H200), and a difference learnt at 16
  rows once priced a 1-row step below zero, so that AR was never chosen.
With CUDA graphs a batch costs what its graph's padded bucket costs, so the table's batch sizes
are the buckets and a batch takes its bucket's costs; otherwise batch sizes 1, 4, 16, .. and a
batch in between is interpolated in log batch."""

import math
import statistics
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable

import torch

from idlm.decoding.layout import max_branches, rows_of
from idlm.engine.round_graphs import CAPTURE_AT_SIGHTING
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.sequence import DraftRows, Sequence

RECENT = 8  # steps of a shape whose median is its cost (contexts grow, so old steps drop out)
MIN_SEEN = 3  # steps of a shape before their median replaces the scaled table
# The (K, b) round shapes the adaptive policy chooses among, all measured (and, on a GPU, their
# graphs captured) before first use: each stride N = 2, 3, 4, 8, 16 with and without branches.
ROUND_SHAPES = ((0, 0), (1, 0), (1, 1), (2, 0), (2, 2), (3, 0), (3, 3), (7, 0), (7, 7), (15, 0), (15, 2))
# Without graphs a step's cost is close to linear in its rows, and every measured step is a full
# forward (on a CPU, tens of milliseconds): three shapes (1, 4 and 16 rows) and one timed run each.
EAGER_SHAPES = ((0, 0), (1, 1), (3, 3))
# Rows past the point where a step costs this many 1-row steps can never pay (a round commits at
# most 1 + K tokens, and rarely that many); the table extrapolates there instead of measuring.
MAX_COST_RATIO = 4.0
# Without graphs a row costs about the same in any step (a CPU's step of 16 requests x 16 rows took
# seconds to time), so eager shapes past this many rows in all are extrapolated, not measured.
EAGER_MAX_ROWS = 32


def rows_of_round(k: int, b: int) -> int:
    """Rows a verify round with k drafts and b branches feeds per request."""
    return rows_of(k, k, b)


class StepCost:
    """Seconds of a decode step of `batch` requests feeding `rows` rows each. The table: per
    measured batch size, linear in rows between the measured row counts (and beyond them);
    between batch sizes, linear in log batch."""

    def __init__(self, measure: Callable[[int, dict[int, float], float], tuple[dict[int, float], float]],
                 max_batch: int, buckets: list[int] | None = None):
        """measure(batch, table so far, rows): the batch size's table with every shape of up to
        `rows` rows measured, and the rows it now covers (inf: every shape there is). A table is
        measured only as far as the rounds asked about reach: on an H200 the whole table at 64
        requests, up to 64-row rounds that a stride of 4 never runs, stalled every running request
        for 5.7 s."""
        self.measure = measure
        self.buckets = buckets is not None
        self.points = buckets or sorted({b for b in (1, 4, 16, 64, 256) if b < max_batch} | {max_batch})
        self.table: dict[int, dict[int, float]] = {}
        self.covered: dict[int, float] = {}  # batch -> the rows up to which its table is measured
        self.seen: dict[tuple[int, int], deque[float]] = {}  # (batch, rows) -> the last steps' seconds
        self.timed: Counter[tuple[int, int]] = Counter()  # (batch, rows) -> steps timed in all
        self.up_front = False  # measuring inside measure_up_to, where no step of real requests is in flight

    @classmethod
    def whole_tables(cls, table: Callable[[int], dict[int, float]], max_batch: int,
                     buckets: list[int] | None = None) -> "StepCost":
        """A StepCost whose batch sizes' tables come whole from table(batch)."""
        return cls(lambda batch, have, rows: (table(batch), math.inf), max_batch, buckets)

    def measure_up_to(self, batch: int, rows: float = math.inf) -> None:
        """Measures now every batch size a step of up to `batch` requests would ask about, every
        round shape of each up to `rows` rows (before any request runs: `up_front` tells the
        measurement so)."""
        self.up_front = True
        try:
            for point in self.points[:1 + next((i for i, p in enumerate(self.points) if p >= batch),
                                                 len(self.points) - 1)]:
                self._measured(point, rows)
        finally:
            self.up_front = False

    def _measured(self, batch: int, rows: float) -> dict[int, float]:
        """The table of `batch`, measured now as far as `rows` where it is not yet."""
        if batch not in self.table or rows > self.covered[batch]:
            self.table[batch], self.covered[batch] = self.measure(batch, self.table.get(batch, {}), rows)
        return self.table[batch]

    def seconds(self, batch: int, rows: int) -> float:
        recent = self.seen.get((batch, rows), ())
        if len(recent) >= MIN_SEEN:
            return statistics.median(recent)
        return self.device_seconds(batch, rows) * self.scale(batch, rows)

    def scale(self, batch: int, rows: int) -> float:
        """What the steps that ran took over what the table says: at this batch size, linear in
        rows between the nearest seen shapes (constant beyond them); else as at the nearest batch
        size with seen steps; 1 where nothing was seen."""
        sizes = {b for b, _ in self.seen}
        if not sizes:
            return 1.0
        near = min(sizes, key=lambda b: (abs(math.log(b / batch)), b))
        ratios = sorted((r, statistics.median(recent) / self.device_seconds(b, r))
                        for (b, r), recent in self.seen.items() if b == near)
        below = [x for x in ratios if x[0] <= rows] or ratios[:1]
        above = [x for x in ratios if x[0] >= rows] or ratios[-1:]
        (r0, f0), (r1, f1) = below[-1], above[0]
        return f0 if r0 == r1 else f0 + (rows - r0) * (f1 - f0) / (r1 - r0)

    def observe(self, batch: int, rows: int, seconds: float) -> None:
        """A decode step that ran, start to the next step's start (learned only once the policy has asked about this
        batch size: observing measures nothing)."""
        lo, hi = self._bracket(batch)
        if lo not in self.table or hi not in self.table:
            return
        self.seen.setdefault((batch, rows), deque(maxlen=RECENT)).append(seconds)
        self.timed[batch, rows] += 1

    def _bracket(self, batch: int) -> tuple[int, int]:
        i = next((i for i, p in enumerate(self.points) if p >= batch), len(self.points) - 1)
        lo, hi = self.points[max(i - 1, 0)], self.points[i]
        return (hi, hi) if batch >= hi or self.buckets else (lo, hi)

    def device_seconds(self, batch: int, rows: int) -> float:
        lo, hi = self._bracket(batch)
        if lo == hi:
            return self._at(hi, rows)
        w = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (1 - w) * self._at(lo, rows) + w * self._at(hi, rows)

    def _at(self, batch: int, rows: int) -> float:
        costs = self._measured(batch, rows)
        xs = sorted(costs)
        if len(xs) == 1:  # only one-row steps were measured: more rows cost in proportion
            return costs[xs[0]] * max(rows, xs[0]) / xs[0]
        i = min(max(1, next((i for i, x in enumerate(xs) if x >= rows), len(xs) - 1)), len(xs) - 1)
        lo, hi = xs[i - 1], xs[i]
        return max(costs[lo] + (rows - lo) * (costs[hi] - costs[lo]) / (hi - lo), costs[xs[0]])


def monotone(costs: dict[int, float]) -> dict[int, float]:
    """More rows never cost less: a measured dip is noise."""
    out, top = {}, 0.0
    for rows in sorted(costs):
        top = max(top, costs[rows])
        out[rows] = top
    return out


def measure_step_cost(runner, max_batch: int) -> StepCost:
    """A StepCost whose batch sizes are measured on the runner's device when first needed."""
    graphs = runner.decode_graphs
    with_graphs = graphs is not None and graphs.use_graphs
    shapes, repeats = (ROUND_SHAPES, 2) if with_graphs else (EAGER_SHAPES, 1)

    def measure(batch: int, have: dict[int, float], up_to: float) -> tuple[dict[int, float], float]:
        costs = dict(have)
        for k, b in sorted(shapes, key=lambda kb: rows_of_round(*kb)):
            rows = rows_of_round(k, b)
            if rows in costs:
                continue
            if rows > up_to:
                return costs, up_to
            if len(costs) >= 2 and max(costs.values()) > MAX_COST_RATIO * costs[1]:
                break
            if costs and not with_graphs and batch * rows > EAGER_MAX_ROWS:
                break
            seqs = [_dummy(runner, k, b) for _ in range(batch)]
            times = []
            for _ in range(repeats + 1):  # the first run warms up (and captures a CUDA graph)
                _sync(runner.device)
                start = time.perf_counter()
                runner.run(seqs, [1] * batch)
                _sync(runner.device)
                times.append(time.perf_counter() - start)
            costs[rows] = monotone({**costs, rows: min(times[1:])})[rows]  # the least disturbed run: a busy
            # host only ever adds time; more rows never cost less (a measured dip is noise)
            if cost.up_front:  # (lazily, a step launched ahead may be in flight, replaying these graphs)
                meet_launched_ahead(runner, seqs)
        return costs, math.inf

    cost = StepCost(measure, max_batch, graphs.buckets if with_graphs else None)  # (measure reads cost.up_front)
    return cost


def meet_launched_ahead(runner, seqs: list[Sequence]) -> None:
    """Runs the step after the measured ones as overlap scheduling launches it (built from the
    carry, its round's integers made inside the round's graph), as often as a round graph must be
    seen to be captured: the measured steps' rounds take the host-built path, whose graphs are
    others. A running batch that meets this shape later (a look of the adaptive policy, a batch
    draining at the end of a run) then replays a graph where it would have stalled for a capture."""
    try:
        for _ in range(CAPTURE_AT_SIGHTING):
            pending = runner.launch_next(seqs)
            if pending is None:
                return
            runner.collect(pending)
    except Exception as e:  # noqa: BLE001 (a warm-up: the shape is met, and its graph captured, when it comes)
        warnings.warn(f"could not run the step after a measured one as overlap scheduling launches it "
                      f"({type(e).__name__}: {e}); its round graph is captured when a batch first needs it",
                      RuntimeWarning, stacklevel=2)
        runner.carry = None  # (whatever the failed step left; the next step is built on the host)


def _dummy(runner, k: int, b: int) -> Sequence:
    """A request one block long whose round has k drafts, k MASKs and b branches, all of its KV
    in the scratch block (reads are garbage, which timing does not mind)."""
    bs = runner.block_size
    mode = "risd" if k else "ar"  # risd: the LoRA's rows cost what they cost; isd's cost no more
    params = SamplingParams(temperature=0, max_tokens=1, mode=mode, stride=k + 1 if k else None, proposal="sample")
    seq = Sequence([0] * bs, params, seed=0)
    seq.num_computed = bs - 1
    seq.block_table = [runner.scratch_block] * (2 + rows_of(k, k, b) // bs)
    hidden = runner.model.cfg.hidden_size
    seq.drafts = [0] * k
    seq.draft_rows = DraftRows(torch.zeros(1, k, hidden, dtype=runner.dtype, device=runner.device),
                               torch.ones(1, k, device=runner.device), 0)
    seq.num_new, seq.num_branches = k, min(b, max_branches(k, k))
    return seq


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
