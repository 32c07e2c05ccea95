"""Where the rows of one ISD round sit: the main chain, then the branches (docs/ARCHITECTURE.md, "Branch drafts").

A request whose pending token is at position P, with D drafts under test, K new drafts to
propose and b branches, feeds these rows, in this order:

    main chain   pending, d_1..d_D, MASK x K      positions P, P+1, .., P+D+K
    branch B_j   MASK x K  (j = 1..b)              positions P+j, .., P+j+K-1

B_j prepares the rejection of d_j: its first MASK stands in for the correction that would take
d_j's position, and its rows propose the drafts that follow it. A B_j row sees the pending
token, d_1..d_{j-1} and the earlier rows of B_j, never d_j or anything after it, so what it
proposes is a function of the tokens that are committed when B_j is used.

Rows take cache slots in feed order, so every row sees only rows at or before its own slot:
the visibility is a sub-mask of causal attention, given per row as a bit set over the round's
rows (bit i: row i is visible).
"""

from dataclasses import dataclass
from functools import lru_cache

MAX_ROUND_ROWS = 64  # visibility bit sets are one int64 per row


@dataclass(frozen=True, slots=True)
class RoundLayout:
    num_drafts: int  # D
    num_new: int  # K
    num_branches: int  # b
    offsets: tuple[int, ...]  # per row: position - P
    visible: tuple[int, ...]  # per row: bit set of the rows it attends to, itself included (as int64)
    is_mask: tuple[bool, ...]  # per row: a MASK row (the gated LoRA is on there)

    @property
    def num_rows(self) -> int:
        return len(self.offsets)

    @property
    def new_drafts_row(self) -> int:
        """First main-chain MASK row: the rows proposing the drafts after a bonus."""
        return 1 + self.num_drafts

    def branch_row(self, j: int) -> int:
        """First row of branch B_j, j = 1..b."""
        assert 1 <= j <= self.num_branches
        return 1 + self.num_drafts + self.num_new * j


def rows_of(num_drafts: int, num_new: int, num_branches: int) -> int:
    return 1 + num_drafts + num_new * (1 + num_branches)


def max_branches(num_drafts: int, num_new: int) -> int:
    """The most branches that fit MAX_ROUND_ROWS (and at most one per draft)."""
    if num_new == 0:
        return 0
    return max(0, min(num_drafts, (MAX_ROUND_ROWS - 1 - num_drafts) // num_new - 1))


def as_int64(bits: int) -> int:
    return bits - (1 << 64) if bits >= 1 << 63 else bits


@lru_cache(maxsize=4096)
def round_layout(num_drafts: int, num_new: int, num_branches: int = 0) -> RoundLayout:
    d, k, b = num_drafts, num_new, num_branches
    assert d >= 0 and k >= 0 and 0 <= b <= d and (b == 0 or k > 0), (d, k, b)
    assert rows_of(d, k, b) <= MAX_ROUND_ROWS, f"a round of {rows_of(d, k, b)} rows is over {MAX_ROUND_ROWS}"
    offsets, visible, is_mask = [], [], []
    for i in range(1 + d + k):  # the main chain: causal
        offsets.append(i)
        visible.append((1 << (i + 1)) - 1)
        is_mask.append(i > d)
    for j in range(1, b + 1):
        first = len(offsets)
        prefix = (1 << j) - 1  # pending, d_1..d_{j-1}
        for i in range(k):
            offsets.append(j + i)
            visible.append(prefix | (((1 << (i + 1)) - 1) << first))
            is_mask.append(True)
    return RoundLayout(d, k, b, tuple(offsets), tuple(as_int64(v) for v in visible), tuple(is_mask))
