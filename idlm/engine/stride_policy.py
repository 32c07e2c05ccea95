"""How many drafts and branches each round proposes (docs/ARCHITECTURE.md, "Adaptive stride").

`fixed` requests propose stride - 1 drafts a round with as many branches as they allow.
`adaptive` requests treat the stride as a maximum: each step the policy picks K (0 = a plain AR
step) and the branches b for them, maximising expected committed tokens per second of the whole
batch, from each request's acceptance by draft position so far and the step cost measured on
this device. Any choice is exact: every draft is verified against the q it was drawn from.

A sampled request with a seed must draw the same tokens in any batch, run and machine; the
tokens it draws depend on the shape of its rounds, and a measured cost is neither stable nor the
same everywhere, so such a request always decodes with its fixed stride. (Greedy output does not
depend on the shape, so greedy requests with a seed adapt.)
"""

from collections.abc import Iterable

import numpy as np

from idlm.decoding.layout import max_branches
from idlm.engine.sampling_params import STRIDE_POLICIES
from idlm.engine.sequence import DraftCounts, Sequence
from idlm.engine.step_cost import StepCost, rows_of_round

PRIOR_ACCEPTANCE = 0.5  # per draft position, before anything is known
PRIOR_WEIGHT = 4.0  # pseudo-rounds the prior counts for in a request's own estimate
MIN_ENGINE_REACHED = 20  # rounds at a position before the engine-wide rate replaces the prior
EXPLORE_EVERY = 16  # after this many plans in a row chose AR, one plan takes the best K > 0 to keep measuring


def expected_tokens(accept: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tokens committed per round, in the steady state, by requests proposing k drafts with b
    branches a round, where draft j is accepted with probability accept[:, j-1] once reached.

    A verify round commits 1 + sum_i prod_{m<=i} a_m; a rejection at j > b leaves no drafts, so
    the next round is cold (1 token). With c = P(cold next) the rounds alternate as a two-state
    chain, giving (E_verify + c) / (1 + c). Shapes: accept [S, J], k and b [S] (J >= max k)."""
    positions = np.arange(1, accept.shape[1] + 1)[None]
    live = positions <= k[:, None]
    a = np.where(live, accept, 0.0)
    reached = np.cumprod(np.concatenate([np.ones((len(a), 1)), a[:, :-1]], axis=1), axis=1)
    e_verify = 1.0 + np.where(live, reached * a, 0.0).sum(axis=1)
    cold = np.where(live & (positions > b[:, None]), reached * (1.0 - a), 0.0).sum(axis=1)
    return (e_verify + cold) / (1.0 + cold)


class StridePolicy:
    """Sets seq.num_new (K) and seq.num_branches before each schedule."""

    def __init__(self, default_policy: str, default_branches: int | None, cost: StepCost, replan_every: int = 8):
        assert default_policy in STRIDE_POLICIES
        self.default_policy = default_policy
        self.default_branches = default_branches
        self.cost = cost
        self.replan_every = replan_every
        self.engine_counts: dict[str, DraftCounts] = {}  # per mode, finished rounds of every request
        self.chosen: dict[int, int] = {}  # K -> decode steps whose adaptive requests used it
        self._last_batch: tuple[int, ...] = ()
        self._since_plan = 0
        self._shared: tuple[int, int] = (0, 0)
        self._ar_plans = 0

    def is_adaptive(self, seq: Sequence) -> bool:
        params = seq.params
        reproducible = params.seed is not None and not params.greedy
        return (params.stride_policy or self.default_policy) == "adaptive" and not reproducible

    def branch_cap(self, seq: Sequence, k: int) -> int:
        wanted = seq.params.branches if seq.params.branches is not None else self.default_branches
        cap = max_branches(k, k)
        return cap if wanted is None else min(wanted, cap)

    def observe(self, seq: Sequence, num_drafts: int, accepted: int) -> None:
        self.engine_counts.setdefault(seq.params.mode, DraftCounts()).record(num_drafts, accepted)

    def plan(self, seqs: Iterable[Sequence], decode: bool = True) -> None:
        """Plans the next round of every sequence; decode=False for a final prefill chunk (a cold
        round of one request, planned alone)."""
        seqs = list(seqs)
        shared = []
        for seq in seqs:
            if self.is_adaptive(seq) and seq.max_new_drafts:
                shared.append(seq)
            else:
                seq.num_new = seq.max_new_drafts
                seq.num_branches = self.branch_cap(seq, seq.num_new)
        if shared:
            self._plan_shared(shared, seqs, decode)

    def _candidates(self, kmax: int) -> list[tuple[int, int]]:
        out = []
        for k in range(kmax + 1):
            for b in sorted({0, 1, 2, max_branches(k, k)}):
                if b <= max_branches(k, k):
                    out.append((k, b))
        return out

    def _acceptance(self, seqs: list[Sequence], positions: int) -> np.ndarray:
        out = np.full((len(seqs), max(positions, 1)), PRIOR_ACCEPTANCE)
        for s, seq in enumerate(seqs):
            prior = out[s].copy()
            engine = self.engine_counts.get(seq.params.mode)
            if engine is not None:
                for j, (r, a) in enumerate(zip(engine.reached[:positions], engine.accepted)):
                    if r >= MIN_ENGINE_REACHED:
                        prior[j] = a / r
            own = seq.stats.drafts
            reached = np.zeros(positions)
            accepted = np.zeros(positions)
            n = min(positions, len(own.reached))
            reached[:n], accepted[:n] = own.reached[:n], own.accepted[:n]
            out[s, :positions] = (accepted + PRIOR_WEIGHT * prior[:positions]) / (reached + PRIOR_WEIGHT)
        return out

    def _plan_shared(self, shared: list[Sequence], batch: list[Sequence], decode: bool) -> None:
        """One (K, b) for the load-following requests: the one with the most expected tokens per
        second for the whole batch, given what the other requests feed."""
        key = tuple(seq.seq_id for seq in batch)
        self._since_plan += 1
        if decode and key == self._last_batch and self._since_plan < self.replan_every:
            k, b = self._shared
        else:
            k, b = self._choose_shared(shared, batch)
            if decode:
                self._last_batch, self._since_plan, self._shared = key, 0, (k, b)
        for seq in shared:
            seq.num_new = min(k, seq.max_new_drafts)
            seq.num_branches = min(b, self.branch_cap(seq, seq.num_new))
        if decode:
            self.chosen[k] = self.chosen.get(k, 0) + 1

    def _choose_shared(self, shared: list[Sequence], batch: list[Sequence]) -> tuple[int, int]:
        mine = set(shared)
        others = [seq for seq in batch if seq not in mine]
        floor_rows = max((seq.layout.num_rows for seq in others), default=1)
        others_tokens = float(len(others))  # their expected tokens do not depend on the choice; 1 is a floor
        kmax = max(seq.max_new_drafts for seq in shared)
        accept = self._acceptance(shared, kmax)
        caps = np.array([seq.max_new_drafts for seq in shared])
        rates = {}
        for k, b in self._candidates(kmax):
            ks = np.minimum(k, caps)
            bs = np.array([min(b, self.branch_cap(seq, kk)) for seq, kk in zip(shared, ks)])
            rows = max(floor_rows, max(rows_of_round(kk, bb) for kk, bb in zip(ks, bs)))
            rates[k, b] = (expected_tokens(accept, ks, bs).sum() + others_tokens) / self.cost.seconds(len(batch), rows)
        choice = max(rates, key=lambda kb: (rates[kb], -kb[0], -kb[1]))  # ties keep the smaller K and b
        self._ar_plans = self._ar_plans + 1 if choice[0] == 0 else 0
        if self._ar_plans >= EXPLORE_EVERY:
            # AR drafts nothing, so the acceptance estimates would never move again: look once
            self._ar_plans = 0
            choice = max((kb for kb in rates if kb[0]), key=lambda kb: (rates[kb], -kb[0], -kb[1]), default=choice)
        return choice
