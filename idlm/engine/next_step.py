"""The next decode step's inputs, built on the device from this step's round (issue 14, item 1).

A round's outcome already fixes most of the next round: the final token becomes the pending one,
the cache is computed up to the pending token plus the accepted drafts (so a request advances by
accepted + 1), and the new drafts, where the round kept any, are the ones the next round tests.
`carry_table` is what a round leaves (run_round computes it inside the round's graph),
`SlotState` the same per request with the host's plan, and `build_step` lays out the next decode
step in the padded [bucket, T] grid of decode_graphs.py, row for row what `DecodeGraphs.run`
builds on the host from `feed_rows`. The host keeps what only it can decide: each request's next
K and branch cap (the stride policy) and the block tables.

The runner uses it (ModelRunner._run_built) for a decode step whose requests are those of the
step before, less any that finished, and for steps launched ahead (overlap scheduling).
tests/test_next_step.py checks it against the host-built steps of real engines (accepts,
rejections, cold rounds, branches, mixed modes and strides, requests joining and leaving,
preemption).
"""

from dataclasses import dataclass

import torch

from idlm.decoding.layout import MAX_ROUND_ROWS, round_layout, rows_of


@dataclass(frozen=True)
class LayoutTable:
    """Every round layout (D drafts, K new, b branches) with K <= max_new, as device tensors
    indexed by a layout id; lookup[d, k, b] is that id (-1: over MAX_ROUND_ROWS)."""

    lookup: torch.Tensor  # [K + 1, K + 1, K + 1] long
    num_rows: torch.Tensor  # [L] long
    offsets: torch.Tensor  # [L, MAX_ROUND_ROWS] long, position - P per row
    visible: torch.Tensor  # [L, MAX_ROUND_ROWS] long, the rows each row attends to (bit set)
    is_mask: torch.Tensor  # [L, MAX_ROUND_ROWS] bool

    @classmethod
    def build(cls, max_new: int, device: torch.device | str) -> "LayoutTable":
        size = max_new + 1
        lookup = torch.full((size, size, size), -1, dtype=torch.long)
        num_rows, offsets, visible, is_mask = [], [], [], []
        for k in range(size):
            for d in range(k + 1):  # a round tests at most K drafts
                for b in range(d + 1 if k else 1):
                    if rows_of(d, k, b) > MAX_ROUND_ROWS:
                        continue
                    lay = round_layout(d, k, b)
                    pad = MAX_ROUND_ROWS - lay.num_rows
                    lookup[d, k, b] = len(num_rows)
                    num_rows.append(lay.num_rows)
                    offsets.append(list(lay.offsets) + [0] * pad)
                    visible.append(list(lay.visible) + [-1] * pad)
                    is_mask.append(list(lay.is_mask) + [False] * pad)
        to = dict(device=device)
        return cls(lookup.to(**to), torch.tensor(num_rows, **to), torch.tensor(offsets, **to),
                   torch.tensor(visible, **to), torch.tensor(is_mask, **to))


def carry_table(final_token: torch.Tensor, pending_slot: torch.Tensor, accepted: torch.Tensor,
                drafts: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """What a round leaves for each request's next one, [B, 3 + K] long: the final token (the new
    pending one), its cache slot, the number of drafts kept and the drafts [B, K]. The pending
    token and the accepted drafts are now in the cache, so the request moves accepted + 1 slots
    on."""
    head = torch.stack([final_token.long(), pending_slot + accepted + 1, num_drafts.long()], 1)
    return torch.cat([head, drafts.long()], 1)


@dataclass(frozen=True)
class SlotState:
    """Per request of a decode batch, in batch order: what its next round feeds. [B] tensors unless noted."""

    pending: torch.Tensor  # the pending token (committed, its KV not yet computed)
    start: torch.Tensor  # num_computed: the pending token's cache slot and position
    drafts: torch.Tensor  # [B, max_new] the drafts after the pending token (num_drafts of them)
    num_drafts: torch.Tensor
    num_new: torch.Tensor  # K of the next round (the host's stride policy)
    num_branches: torch.Tensor  # branches the next round may feed (the policy's cap)
    mask_id: torch.Tensor  # the MASK token of the request's mode (0 for ar: never fed)
    gated: torch.Tensor  # bool: risd, the gated LoRA is on at MASK rows
    # bool, or None for all: False marks a padding entry of a whole bucket (its rows come out as
    # the padding of DecodeGraphs.run, whatever its other values)
    valid: torch.Tensor | None = None

    @classmethod
    def from_carry(cls, table: torch.Tensor, num_new: torch.Tensor, num_branches: torch.Tensor,
                   mask_id: torch.Tensor, gated: torch.Tensor, valid: torch.Tensor | None = None) -> "SlotState":
        """The state a carry_table leaves, with the host's plan for the next round: K, branch cap,
        MASK token and LoRA gate per request."""
        n = num_new.shape[0]
        return cls(pending=table[:n, 0], start=table[:n, 1], drafts=table[:n, 3:], num_drafts=table[:n, 2],
                   num_new=num_new, num_branches=num_branches, mask_id=mask_id, gated=gated, valid=valid)


@dataclass(frozen=True)
class StepInputs:
    """A padded decode step's rows ([bucket * T]) and per-request values ([bucket]), as
    DecodeGraphs.step copies them into its graph's buffers."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    gate: torch.Tensor  # bool
    tree_bits: torch.Tensor
    context_lens: torch.Tensor
    tree_rows: torch.Tensor


def build_step(state: SlotState, layouts: LayoutTable, block_tables: torch.Tensor, tokens: int, bucket: int,
               block_size: int, scratch_slot: int) -> StepInputs:
    """The next decode step of the batch in state, T = tokens rows per request (at least its widest
    round) and `bucket` requests (those past the batch, and those state.valid marks False, are
    padding); block_tables [B, width] must cover every row's cache slot. Padding takes what
    DecodeGraphs.run gives it: token 0, positions running on from 0, the scratch slot, no gate, no
    tree bits, context T."""
    batch, device = state.pending.shape[0], state.pending.device
    d = torch.minimum(state.num_drafts, state.num_new)
    ids_of = layouts.lookup[d, state.num_new, torch.minimum(state.num_branches, d)]
    rows = layouts.num_rows[ids_of]
    start = state.start
    if state.valid is not None:
        rows, start = torch.where(state.valid, rows, 0), torch.where(state.valid, start, 0)
    col = torch.arange(tokens, device=device)
    real = col[None] < rows[:, None]  # [B, T]
    offsets = layouts.offsets[ids_of, :tokens]
    mask = layouts.is_mask[ids_of, :tokens] & real
    draft_cols = (col[None] - 1).clamp(0, state.drafts.shape[1] - 1).expand(batch, -1)
    ids = torch.where(col[None] == 0, state.pending[:, None],
                      torch.where(mask, state.mask_id[:, None], torch.gather(state.drafts, 1, draft_cols)))
    ids = torch.where(real, ids, 0)
    positions = start[:, None] + torch.where(real, offsets, col[None])
    cache_index = start[:, None] + col[None]
    tables = block_tables.long()
    block = torch.gather(tables, 1, (cache_index // block_size).clamp(max=tables.shape[1] - 1))
    slots = torch.where(real, block * block_size + cache_index % block_size, scratch_slot)
    gate = mask & state.gated[:, None]
    tree_bits = torch.where(real, layouts.visible[ids_of, :tokens], -1)
    context = start + tokens
    extra = bucket - batch
    pad_rows = lambda value: torch.full((extra * tokens,), value, dtype=torch.long, device=device)  # noqa: E731
    return StepInputs(
        ids=torch.cat([ids.flatten(), pad_rows(0)]),
        positions=torch.cat([positions.flatten(), col.repeat(extra)]),
        slots=torch.cat([slots.flatten(), pad_rows(scratch_slot)]),
        gate=torch.cat([gate.flatten(), torch.zeros(extra * tokens, dtype=torch.bool, device=device)]),
        tree_bits=torch.cat([tree_bits.flatten(), pad_rows(-1)]),
        context_lens=torch.cat([context, torch.full((extra,), tokens, dtype=torch.long, device=device)]),
        tree_rows=torch.full((bucket,), tokens, dtype=torch.long, device=device),
    )
