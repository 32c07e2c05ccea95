"""The decoding round of a CUDA-graph decode step, replayed as a CUDA graph too.

Eagerly a round is a hundred-odd small kernels (distributions, the acceptance scan, residual and
bonus draws, new drafts), each costing the host about as much as the whole forward costs the GPU
at small batches; replayed, it costs one launch. A graph reads the hidden states and logits
that one forward graph leaves in its static outputs, so it is keyed by that forward graph and by
the round's shape (round_step.RoundShape); its inputs travel in static buffers filled by one
host-to-device copy per dtype, and the drafts under test are gathered into them from where the
round before left them.

Without capture (the CPU), the same static buffers and padding run eagerly: the check of
this path in tests.
"""

from collections.abc import Callable

import torch

from idlm.engine.round_step import FLOATS, RoundResult, RoundShape, run_round
from idlm.models.transformer import CausalLM, fused_elementwise

CAPTURE_AT_SIGHTING = 2


class RoundGraph:
    """One captured round: its static inputs and outputs."""

    def __init__(self, model: CausalLM, hidden: torch.Tensor, all_logits: torch.Tensor | None, shape: RoundShape,
                 banned_token: int | None, pool, capture: bool,
                 build: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """build: the round's integers made inside the graph from static buffers and the
        request constants (a step launched ahead: round_step.built_round_inputs), so that
        replay takes `constants` on the device instead of the integers from the host."""
        device = hidden.device
        b, d = shape.batch, shape.dmax
        self.ints = torch.zeros(sum(shape.int_sizes()), dtype=torch.long, device=device)
        self.constants = torch.zeros(4 * b, dtype=torch.long, device=device)
        self.floats = torch.ones(len(FLOATS) * b, dtype=torch.float32, device=device)
        self.stored_hidden = torch.zeros(b * d, hidden.shape[-1], dtype=hidden.dtype, device=device) if d else None
        self.draft_q = torch.ones(b * d, dtype=torch.float32, device=device)
        self.built = build is not None
        self.last_floats: list[float] | None = None  # what floats holds (a batch's sampling settings rarely change)

        def body(hidden: torch.Tensor, all_logits: torch.Tensor | None) -> RoundResult:
            ints = build(self.constants) if build is not None else self.ints
            return run_round(model, hidden, all_logits, ints, self.floats, self.stored_hidden, self.draft_q,
                             shape, banned_token)

        self.body = body
        self.graph = None
        if not capture:
            return
        torch.cuda.synchronize(device)
        with fused_elementwise():
            body(hidden, all_logits)  # compiles and allocates outside the capture
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.result = body(hidden, all_logits)

    def replay(self, hidden: torch.Tensor, all_logits: torch.Tensor | None, ints: torch.Tensor,
               floats: list[float], pinned: Callable[[list, torch.dtype], torch.Tensor],
               stored: list[torch.Tensor], stored_q: list[torch.Tensor],
               stored_slots: torch.Tensor | None) -> RoundResult:
        """ints: a pinned host tensor, or for a graph with `build` the request constants on the
        device; floats: the sampling settings, sent only when they changed (pinned: a list as a
        pinned host tensor); stored[i] / stored_q[i]: a request's drafts under test (hidden rows
        and q), going to rows stored_slots of the static buffers. A captured graph reads the
        hidden/all_logits it was captured with: the same static tensors."""
        (self.constants if self.built else self.ints).copy_(ints, non_blocking=True)
        if floats != self.last_floats:
            self.floats.copy_(pinned(floats, torch.float32), non_blocking=True)
            self.last_floats = floats
        if stored:
            self.stored_hidden.index_copy_(0, stored_slots, stored[0] if len(stored) == 1 else torch.cat(stored))
            q = stored_q[0] if len(stored_q) == 1 else torch.cat(stored_q)
            self.draft_q.index_copy_(0, stored_slots, q.float())
        if self.graph is None:
            return self.body(hidden, all_logits)
        self.graph.replay()
        r = self.result
        # the next replay overwrites the outputs; the new drafts' rows live on in their requests
        return RoundResult(r.packed, r.names, None if r.new_q is None else r.new_q.clone(),
                           None if r.new_hidden is None else r.new_hidden.clone(), r.carry.clone())


class RoundGraphs:
    def __init__(self, model: CausalLM, banned_token: int | None, capture: bool):
        self.model = model
        self.capture = capture
        self.banned_token = banned_token
        self.graphs: dict[tuple[int, RoundShape], RoundGraph] = {}
        self.seen: dict[tuple[int, RoundShape], int] = {}
        self.pool = None
        self.made = 0  # rounds that were not a replay: captures and first sightings (run eagerly)

    def get(self, hidden: torch.Tensor, all_logits: torch.Tensor | None, shape: RoundShape,
            build: Callable[[torch.Tensor], torch.Tensor] | None = None, build_key=None) -> RoundGraph:
        """The graph of this shape over the forward graph whose static outputs are hidden/all_logits
        (with `build`: RoundGraph's, which depends on build_key besides, a graph kept for each)."""
        key = (hidden.data_ptr() if self.capture else 0, shape, build_key if build is not None else None)
        if key in self.graphs:
            return self.graphs[key]
        # a shape is captured the second time it comes: a capture stalls every running request
        # for some milliseconds, which a shape seen once (a passing batch size, say) never repays
        seen = self.seen.get(key, 0) + 1
        self.seen[key] = seen
        capture = self.capture and seen >= CAPTURE_AT_SIGHTING
        if capture and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = RoundGraph(self.model, hidden, all_logits, shape, self.banned_token, self.pool, capture, build)
        self.made += 1
        if capture or not self.capture:
            self.graphs[key] = graph
        return graph
