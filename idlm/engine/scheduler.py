from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from idlm.config import EngineConfig
from idlm.decoding.layout import rows_of
from idlm.engine.block_manager import BlockManager
from idlm.engine.sequence import Sequence, SequenceStatus
from idlm.engine.stride_policy import StridePolicy


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # committed tokens each sequence feeds from token_ids[num_computed:]
    is_prefill: bool


class Scheduler:
    """Continuous batching: prefill admission under a token budget (long prompts chunked), else
    one decode step for every running sequence; recompute preemption when blocks run out. The
    stride policy shapes each sequence's round before its blocks are reserved."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager, policy: StridePolicy):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # sees every batch handed out (the engine hands it a batch of schedule_next once it runs)
        self.on_schedule: Callable[[ScheduledBatch], None] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch is not None and self.on_schedule is not None:
            self.on_schedule(batch)
        return batch

    def schedule_prefill(self) -> ScheduledBatch | None:
        """A prefill step of waiting requests alone, or None (overlap scheduling: launched while a
        decode step of the running ones is in flight, whose outcome it does not depend on; the
        slots and blocks that step may free are not counted yet)."""
        batch = self._schedule_prefill()
        if batch is not None and self.on_schedule is not None:
            self.on_schedule(batch)
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        bm = self.block_manager
        seqs, counts = [], []
        budget = self.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not seq.needs_prompt_rows:
                bm.match_prefix(seq)
            room = (len(seq.block_table) + bm.num_free) * bm.block_size - seq.num_computed
            remaining = len(seq) - seq.num_computed
            self.policy.plan([seq], decode=False)
            n = min(remaining, budget, room)
            if n == remaining and n + seq.num_lookahead > room:
                n = remaining - 1  # the final chunk needs room for its drafts and MASKs too
            if n <= 0:
                break
            bm.reserve(seq, seq.num_computed + n + (seq.num_lookahead if n == remaining else 0))
            seqs.append(seq)
            counts.append(n)
            budget -= n
            if n < remaining:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return ScheduledBatch(seqs, counts, is_prefill=True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        bm = self.block_manager
        seqs, counts = [], []
        self.policy.plan(self.running)
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:
                continue
            n = len(seq) - seq.num_computed
            while not bm.can_reserve(seq, seq.num_computed + n + seq.num_lookahead):
                victim = self._pick_victim(seq)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                bm.reserve(seq, seq.num_computed + n + seq.num_lookahead)
                seqs.append(seq)
                counts.append(n)
        return ScheduledBatch(seqs, counts, is_prefill=False) if seqs else None

    def schedule_next(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """The decode step of seqs (the requests of a step in flight, those that finished left
        out; after a prefill step, every running request) planned and given its blocks before the
        outcome of the step in flight is known (overlap scheduling), or None where it must wait
        for that outcome: requests wait to be admitted, seqs are not the running set (one was
        preempted), a plan changes (a plan drawn now decides the step after next as well), or the
        blocks run short (preemption waits for the outcome). Blocks cover what the step can
        reach: the pending token moves on by at most D + 1 (1 after a prompt's last chunk), and
        a round then feeds at most the rows of D = K."""
        if self.waiting or not seqs or seqs != self.running:
            return None
        plans = [(seq.num_new, seq.num_branches) for seq in seqs]
        self.policy.plan(seqs)
        if [(seq.num_new, seq.num_branches) for seq in seqs] != plans:
            for seq, (k, b) in zip(seqs, plans):
                seq.num_new, seq.num_branches = k, b
            return None
        bm = self.block_manager
        reach = [len(seq) + seq.layout.num_drafts + rows_of(k, k, min(b, k)) for seq, (k, b) in zip(seqs, plans)]
        needed = [bm.blocks_needed(seq, n) for seq, n in zip(seqs, reach)]
        if sum(needed) > bm.num_free:
            return None
        for seq, n, new_blocks in zip(seqs, reach, needed):
            if new_blocks:
                bm.reserve(seq, n)
        return ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)

    def _pick_victim(self, needy: Sequence) -> Sequence:
        """Blocks held by a half-prefilled waiting sequence go first, then the newest runner."""
        if self.waiting and self.waiting[0].block_table:
            return self.waiting[0]
        return self.running[-1] if self.running[-1] is not needy else needy

    def preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.stats.preemptions += 1
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.finish(reason)
