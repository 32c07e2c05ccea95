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

import copy
from collections.abc import Iterable

import numpy as np

from idlm.config import MAX_STRIDE
from idlm.decoding.layout import max_branches
from idlm.engine.sampling_params import STRIDE_POLICIES
from idlm.engine.sequence import DraftCounts, Sequence
from idlm.engine.step_cost import MIN_SEEN, ROUND_SHAPES, StepCost, rows_of_round

PRIOR_ACCEPTANCE = 0.5  # per draft position, before anything is known
PRIOR_WEIGHT = 4.0  # pseudo-rounds the prior counts for in a request's own estimate
# A request's own counts lose this share of their weight with each token it commits without testing
# drafts (AR steps, cold rounds), so that its estimate returns to the prior. A request's acceptance
# persists (over 48 held-out answers, its two halves correlate 0.59) but a bad streak mostly passes
# (consecutive rounds 0.32, eight apart 0.23); with frozen counts a request that went AR after one
# stayed AR to its end (H200, one request: 20% of plans AR, those stretches accepting no less than the
# rest, 2% below the fixed stride). Replayed over those answers' rounds (benchmarks/policy_traces.py),
# 0.9 lost 0.4% to the fixed stride where rounds pay (frozen: 1.7-3.4%) and kept the 4% gain near
# break-even.
OWN_FADE = 0.9
MIN_ENGINE_REACHED = 20  # rounds at a position before the engine-wide rate replaces the prior
BRANCH_ROOM = np.array([max_branches(k, k) for k in range(MAX_STRIDE)])  # by K: the branches that fit
# after this many plans in a row chose AR, the policy looks at the best K > 0 to keep measuring, if
# a round of that K could pay were every draft accepted (on a CPU a round can cost 3 AR steps: no
# acceptance makes it pay, and looking would only cost); and at once where no round was ever timed,
# or looked at, at a batch size near this one
EXPLORE_EVERY = 16
# Each look after which AR still wins doubles that interval, up to this many plans (a look at a round
# that loses costs a few rounds: on a CPU, where a round costs 3-5 AR steps, looks every 16 plans made
# the default 4% slower than `ar`); a choice of drafts starts it again from EXPLORE_EVERY.
EXPLORE_MAX = 256
# A look lasts until MIN_SEEN steps of the round looked at were timed, or this many steps: its first
# step is a cold round, and the first steps of a shape capture CUDA graphs, which are not timed. On
# an H200 at one request, looks of two steps never timed a round (both captured), so the policy
# priced rounds from the table, at 2-3 times what they cost, and ran 0.6x the fixed stride.
LOOK_STEPS = 8
# A new choice must beat the running one by this factor: switching costs a round (drafts made for
# the old shape are dropped, or a cold round is needed), and the estimates are noisy.
HYSTERESIS = 1.03
# A round with drafts must beat an AR step by this factor, for costs its step price leaves out: the
# rounds after a switch, and requests that finish out of step, so that newcomers arrive one by one and
# each costs a prefill step of its own. On an H200 at 64 requests with refills (2026-12-01) rounds were
# priced 7% better than AR steps yet ran 17% slower: 148 prefill steps against AR's 8. (A batch of one
# request has no others to finish out of step with: there the margin is HYSTERESIS's alone.)
ROUND_MARGIN = 1.10


def round_tables(accept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request, for k = 0..J: sum_{j<=k} P(reach j) a_j and sum_{j<=k} P(reach j) (1 - a_j),
    where draft j is accepted with probability accept[:, j-1] once reached. [S, J+1] each."""
    reach = np.cumprod(np.concatenate([np.ones((len(accept), 1)), accept[:, :-1]], axis=1), axis=1)
    zero = np.zeros((len(accept), 1))
    return (np.concatenate([zero, np.cumsum(reach * accept, axis=1)], axis=1),
            np.concatenate([zero, np.cumsum(reach * (1.0 - accept), axis=1)], axis=1))


def expected_tokens(accept: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tokens committed per round, in the steady state, by requests proposing k drafts with b
    branches a round (accept [S, J], J >= max k; k and b [S] or [C, S] for C candidates).

    A verify round commits 1 + sum_i prod_{m<=i} a_m; a rejection at j > b leaves no drafts, so
    the next round is cold (1 token). With c = P(cold next) the rounds alternate as a two-state
    chain, giving (E_verify + c) / (1 + c)."""
    accepted, rejected = round_tables(accept)
    rows = np.arange(len(accept))
    e_verify = 1.0 + accepted[rows, k]
    cold = rejected[rows, k] - rejected[rows, np.minimum(b, k)]
    return (e_verify + cold) / (1.0 + cold)


def near(batch: int, other: int) -> bool:
    """Batch sizes within a factor of 2 of each other."""
    return batch <= 2 * other and other <= 2 * batch


# what plan() changes (StridePolicy.state)
PLANNING_STATE = ("chosen", "_last_batch", "_since_plan", "_shared", "_ar_plans", "_look", "_looked", "_looked_ar",
                  "_explore_every", "_judge_look")


class StridePolicy:
    """Sets seq.num_new (K) and seq.num_branches before each schedule."""

    def __init__(self, default_policy: str, default_branches: int | None, cost: StepCost, replan_every: int = 16):
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
        # a look in progress: (batch size, rows of the round looked at, its steps timed before, steps left)
        self._look: tuple[int, int, int, int] | None = None
        self._looked: set[int] = set()  # the batch sizes of every look begun
        self._looked_ar: set[int] = set()  # the batch sizes of every look at AR steps begun
        self._explore_every = EXPLORE_EVERY  # AR plans between looks, now
        self._judge_look = False  # a look has ended: the next choice tells whether it found rounds that pay
        # batch size -> [choices, sum of the best round's priced rate over an AR step's, margin left out]:
        # what `idlm bench` sets beside the rates that ran, to see what a step's price leaves out (a plan
        # taken back and made again counts twice here)
        self.priced: dict[int, list[float]] = {}

    def state(self) -> dict:
        """What planning changes, for restore(): a step planned and then not launched (overlap
        scheduling: the plan changed, or the step could not be built ahead) is planned again, and
        must count once (a look at drafts counted twice lasted one step: its cold round)."""
        return {name: copy.copy(getattr(self, name)) for name in PLANNING_STATE}

    def restore(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, copy.copy(value))

    def is_adaptive(self, seq: Sequence) -> bool:
        params = seq.params
        reproducible = params.seed is not None and not params.greedy
        return (params.stride_policy or self.default_policy) == "adaptive" and not reproducible

    def branch_cap(self, seq: Sequence, k: int) -> int:
        wanted = seq.params.branches if seq.params.branches is not None else self.default_branches
        cap = max_branches(k, k)
        return cap if wanted is None else min(wanted, cap)

    def observe(self, mode: str, num_drafts: int, accepted: int, times: int = 1) -> None:
        """`times` finished rounds of requests in `mode` (the engine tallies a step's rounds)."""
        counts = self.engine_counts.get(mode)
        if counts is None:
            counts = self.engine_counts[mode] = DraftCounts()
        counts.record(num_drafts, accepted, times)

    def plan(self, seqs: Iterable[Sequence], decode: bool = True) -> None:
        """Plans the next round of every sequence; decode=False for a final prefill chunk (a cold
        round of one request, planned alone)."""
        seqs = list(seqs)
        shared = []
        for seq in seqs:
            drafts = seq.max_new_drafts
            if not drafts:  # an `ar` request (every step of a 64-request batch plans each one)
                seq.num_new = seq.num_branches = 0
            elif self.is_adaptive(seq):
                shared.append(seq)
            else:
                seq.num_new = drafts
                seq.num_branches = self.branch_cap(seq, drafts)
        if shared:
            self._plan_shared(shared, seqs, decode)

    def _acceptance(self, seqs: list[Sequence], positions: int) -> np.ndarray:
        """[S, positions]: each request's acceptance by draft position, its own counts (faded by
        OWN_FADE a token since it last tested drafts) shrunk towards its mode's engine-wide rate (or
        PRIOR_ACCEPTANCE) with PRIOR_WEIGHT pseudo-rounds."""
        priors = {}
        for mode in {seq.params.mode for seq in seqs}:
            prior = np.full(positions, PRIOR_ACCEPTANCE)
            engine = self.engine_counts.get(mode)
            if engine is not None:
                for j, (r, a) in enumerate(zip(engine.reached[:positions], engine.accepted)):
                    if r >= MIN_ENGINE_REACHED:
                        prior[j] = a / r
            priors[mode] = prior
        pad = [0] * positions
        fade = OWN_FADE ** np.array([[seq.tokens_since_verify] for seq in seqs], dtype=float)
        reached = fade * np.array([(seq.stats.drafts.reached + pad)[:positions] for seq in seqs], dtype=float)
        accepted = fade * np.array([(seq.stats.drafts.accepted + pad)[:positions] for seq in seqs], dtype=float)
        prior = np.stack([priors[seq.params.mode] for seq in seqs])
        return (accepted + PRIOR_WEIGHT * prior) / (reached + PRIOR_WEIGHT)

    def _plan_shared(self, shared: list[Sequence], batch: list[Sequence], decode: bool) -> None:
        """One (K, b) for the load-following requests: the one with the most expected tokens per
        second for the whole batch, given what the other requests feed. Chosen again when the
        batch size changes or every `replan_every` steps (estimates move slowly; choosing costs
        host time that a small step cannot spare)."""
        key = (len(batch), len(shared))
        self._since_plan += decode
        if decode and self._look is not None and (key != self._last_batch or self._look_done()):
            self._judge_look = self._look[1] > 1  # a look at drafts (not at AR steps) is judged by the next choice
            self._look, self._since_plan = None, self.replan_every  # the look is over: choose with its price
        if self._look is not None and decode:
            k, b = self._shared
            batch_size, rows, timed_before, left = self._look
            self._look = (batch_size, rows, timed_before, left - 1)
        elif (key == self._last_batch and self._since_plan < self.replan_every) or (not decode and self._last_batch):
            k, b = self._shared  # a request joining the batch takes the running plan
        else:
            (k, b), look_rows = self._choose_shared(shared, batch, decode)
            if decode:
                self._last_batch, self._shared, self._since_plan = key, (k, b), 0
                if look_rows:
                    self._look = (len(batch), look_rows, self.cost.timed[len(batch), look_rows], LOOK_STEPS - 1)
        for seq in shared:
            seq.num_new = min(k, seq.max_new_drafts)
            seq.num_branches = min(b, self.branch_cap(seq, seq.num_new))
        if decode:
            self.chosen[k] = self.chosen.get(k, 0) + 1

    def _unexplored(self, batch: int, ar: bool) -> bool:
        """No step of the kind (AR steps, or rounds with drafts) was timed, or looked at, near batch."""
        looked = self._looked_ar if ar else self._looked
        return not any(near(b, batch) for b in looked) and not any(
            (rows == 1) == ar and near(b, batch) for b, rows in self.cost.seen)

    def _look_done(self) -> bool:
        batch, rows, timed_before, left = self._look
        return left <= 0 or self.cost.timed[batch, rows] - timed_before >= MIN_SEEN

    def _choose_shared(self, shared: list[Sequence], batch: list[Sequence],
                       decode: bool) -> tuple[tuple[int, int], int]:
        """The (K, b) to run, and for a look at drafts rather than the best choice the rows of the
        round looked at (else 0). decode=False (a prompt's final chunk): the best choice alone, and
        the policy's counts untouched (no decode step runs it)."""
        mine = set(shared)
        others = [seq for seq in batch if seq not in mine]
        floor_rows = max((seq.layout.num_rows for seq in others), default=1)
        others_tokens = float(len(others))  # their expected tokens do not depend on the choice; 1 is a floor
        caps = np.array([seq.max_new_drafts for seq in shared])
        kmax = int(caps.max())
        wanted = np.array([seq.params.branches if seq.params.branches is not None
                           else self.default_branches if self.default_branches is not None else MAX_STRIDE
                           for seq in shared])
        candidates = [(k, b) for k, b in ROUND_SHAPES if k <= kmax]
        candidates += [kb for kb in ((kmax, 0), (kmax, int(BRANCH_ROOM[kmax]))) if kb not in candidates]
        k_c, b_c = (np.array(x)[:, None] for x in zip(*candidates))  # [C, 1]
        ks = np.minimum(k_c, caps[None])  # [C, S]
        bs = np.minimum(np.minimum(b_c, wanted[None]), BRANCH_ROOM[ks])
        tokens = expected_tokens(self._acceptance(shared, kmax), ks, bs).sum(axis=1) + others_tokens
        rows = np.maximum(rows_of_round(ks, bs).max(axis=1), floor_rows)
        seconds = [self.cost.seconds(len(batch), int(r)) for r in rows]
        margin = ROUND_MARGIN if len(batch) > 1 else 1.0
        priced = {kb: t / s for kb, t, s in zip(candidates, tokens, seconds)}
        rates = {kb: rate / (margin if kb[0] else 1.0) for kb, rate in priced.items()}
        if decode:
            tally = self.priced.setdefault(len(batch), [0, 0.0])
            tally[0] += 1
            tally[1] += max(rate for kb, rate in priced.items() if kb[0]) / priced[0, 0]
        choice = max(rates, key=lambda kb: (rates[kb], -kb[0], -kb[1]))  # ties keep the smaller K and b
        if self._shared in rates and rates[choice] < HYSTERESIS * rates[self._shared]:
            choice = self._shared
        if not decode:
            return choice, 0
        self._ar_plans = self._ar_plans + 1 if choice[0] == 0 else 0
        judged, self._judge_look = self._judge_look, False
        if choice[0]:
            self._explore_every = EXPLORE_EVERY
            # rounds win, but where no AR step was timed near this batch size its price is the table's
            # times what rounds cost over theirs, a guess (the table's dummy requests have one-block
            # contexts): on a CPU it priced a round at 1.5 AR steps where it took 2.2, and rounds ran on
            # at a loss. Look at AR steps, once
            if floor_rows == 1 and self._unexplored(len(batch), ar=True):
                self._looked_ar.add(len(batch))
                return (0, 0), 1
            return choice, 0
        if judged:  # a look, and still AR: look less often
            self._explore_every = min(2 * self._explore_every, EXPLORE_MAX)
        # AR drafts nothing, so the acceptance estimates would never move again: look, at a round
        # that every draft accepted would make pay
        best_case = (1 + ks).sum(axis=1) + others_tokens
        could_pay = {kb: int(r) for kb, t, s, r in zip(candidates, best_case, seconds, rows)
                     if kb[0] and t / s > rates[choice]}
        if could_pay:
            look = max(could_pay, key=lambda kb: (rates[kb], -kb[0], -kb[1]))
            # at once where no round was ever timed, or looked at, near this batch size (looked at
            # once only: a batch that keeps changing ends every look before its round is timed)
            if self._ar_plans >= self._explore_every or self._unexplored(len(batch), ar=False):
                self._ar_plans = 0
                self._looked.add(len(batch))
                return look, could_pay[look]
        return choice, 0
