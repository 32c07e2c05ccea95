from dataclasses import dataclass, field

from idlm.engine.sequence import DraftCounts, Sequence


def request_stats(seq: Sequence, full: bool = True) -> dict:
    """full=False: the counters only (what a stream chunk carries; every step builds one)."""
    st = seq.stats
    tokens = seq.num_output_tokens
    counters = {"forwards": st.forwards, "tokens": tokens, "tokens_per_forward": tokens / st.forwards if st.forwards
                else 0.0}
    if not full:
        return counters
    return counters | {
        "preemptions": st.preemptions,
        "cold_rounds": st.cold_rounds,
        "verify_rounds": st.verify_rounds,
        "branch_rounds": st.branch_rounds,
        "branch_drafts_accepted": st.branch_drafts_accepted,
        "drafts": st.drafts.as_dict(),
    }


@dataclass
class EngineStats:
    """Engine-wide counters since start."""

    forwards: int = 0
    requests: int = 0
    tokens: int = 0
    request_forwards: int = 0
    drafts: DraftCounts = field(default_factory=DraftCounts)
    cold_rounds: int = 0
    verify_rounds: int = 0
    branch_rounds: int = 0
    branch_drafts_accepted: int = 0
    # decode steps launched before the outcome of the step before was read (overlap scheduling);
    # the others waited for it: a plan that changed, a request that joined, left or needs host work
    decode_steps_launched_ahead: int = 0

    def record_finished(self, seq: Sequence) -> None:
        self.requests += 1
        self.tokens += seq.num_output_tokens
        self.request_forwards += seq.stats.forwards

    @property
    def tokens_per_forward(self) -> float:
        """Per request: output tokens over the forwards that request took part in."""
        return self.tokens / self.request_forwards if self.request_forwards else 0.0
