"""A device-built decode step's rows, and its round's integers, each in one Triton kernel (CUDA
graphs, engine/next_step.py).

`next_step.build_step` lays out the next decode step from the last round's carry and the host's
plan in about fifty small torch ops (where, gather, cat, full, copies into the graph's buffers),
and `round_step.built_round_inputs` the round's integers in about twenty. Inside a CUDA graph each
is a kernel launch of ~3 us, and on an H200 an `ar` step of SmolLM2 at C = 1 is ~430 launches and
~1 ms of GPU time, so they were about a fifth of it. Here one program per request writes its T
rows (ids, positions, cache slots, LoRA gate, tree bits) and its context length straight into the
buffers the forward reads, and another its round's integers, with the torch versions' values,
padding included.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _build_step(
    carry_ptr, plan_ptr, lookup_ptr, num_rows_ptr, offsets_ptr, visible_ptr, is_mask_ptr, tables_ptr,
    ids_ptr, positions_ptr, slots_ptr, gate_ptr, tree_bits_ptr, context_ptr, tree_rows_ptr,
    stride_carry, stride_plan, stride_table, num_layouts, width, max_new, block_size, scratch_slot,
    TOKENS: tl.constexpr, BLOCK_T: tl.constexpr, LOOKUP: tl.constexpr, LAYOUT_ROWS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pending = tl.load(carry_ptr + b * stride_carry)
    start = tl.load(carry_ptr + b * stride_carry + 1)
    num_drafts = tl.load(carry_ptr + b * stride_carry + 2)
    k = tl.load(plan_ptr + b)
    branches = tl.load(plan_ptr + stride_plan + b)
    mask_id = tl.load(plan_ptr + 2 * stride_plan + b)
    gated = tl.load(plan_ptr + 3 * stride_plan + b) != 0
    valid = tl.load(plan_ptr + 4 * stride_plan + b) != 0
    d = tl.minimum(num_drafts, k)
    layout = tl.load(lookup_ptr + (d * LOOKUP + k) * LOOKUP + tl.minimum(branches, d))
    layout = tl.where(layout < 0, layout + num_layouts, layout)  # (as torch indexes with -1)
    rows = tl.where(valid, tl.load(num_rows_ptr + layout), 0)
    start = tl.where(valid, start, 0)

    col = tl.arange(0, BLOCK_T)
    in_step = col < TOKENS
    real = (col < rows) & in_step
    at = layout * LAYOUT_ROWS + col
    offsets = tl.load(offsets_ptr + at, mask=in_step, other=0)
    mask = (tl.load(is_mask_ptr + at, mask=in_step, other=0) != 0) & real
    draft_col = tl.minimum(tl.maximum(col - 1, 0), max_new - 1)
    drafts = tl.load(carry_ptr + b * stride_carry + 3 + draft_col, mask=in_step, other=0)
    ids = tl.where(col == 0, pending, tl.where(mask, mask_id, drafts))
    ids = tl.where(real, ids, 0)
    positions = start + tl.where(real, offsets, col)
    cache_index = start + col
    block = tl.load(tables_ptr + b * stride_table + tl.minimum(cache_index // block_size, width - 1),
                    mask=in_step, other=0).to(tl.int64)
    slots = tl.where(real, block * block_size + cache_index % block_size, scratch_slot)
    gate = tl.where(mask & gated, 1.0, 0.0)
    tree_bits = tl.where(real, tl.load(visible_ptr + at, mask=in_step, other=-1), -1)

    out = b * TOKENS + col
    tl.store(ids_ptr + out, ids, mask=in_step)
    tl.store(positions_ptr + out, positions, mask=in_step)
    tl.store(slots_ptr + out, slots, mask=in_step)
    tl.store(gate_ptr + out, gate, mask=in_step)
    tl.store(tree_bits_ptr + out, tree_bits, mask=in_step)
    tl.store(context_ptr + b, (start + TOKENS).to(tl.int32))
    tl.store(tree_rows_ptr + b, TOKENS)


def build_step_into(carry: torch.Tensor, plan: torch.Tensor, layouts, tables: torch.Tensor, tokens: int,
                    block_size: int, scratch_slot: int, is_mask: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """build_step of the state SlotState.from_carry(carry, *plan) (carry [bucket, 3 + K] long,
    plan [5, bucket] long: K, branch cap, MASK id, gated, valid), T = tokens rows per request,
    written into out's ids, positions, slots, tree_bits (long, [bucket * T] at least), gate
    (float32) and context_lens, tree_rows (int32, [bucket]). tables [bucket, width] int32;
    is_mask: layouts.is_mask as int8."""
    bucket = carry.shape[0]
    lookup = layouts.lookup
    _build_step[(bucket,)](
        carry, plan, lookup, layouts.num_rows, layouts.offsets, layouts.visible, is_mask, tables,
        out["ids"], out["positions"], out["slots"], out["gate"], out["tree_bits"], out["context_lens"],
        out["tree_rows"],
        carry.stride(0), plan.stride(0), tables.stride(0), layouts.num_rows.shape[0], tables.shape[1],
        carry.shape[1] - 3, block_size, scratch_slot,
        TOKENS=tokens, BLOCK_T=triton.next_power_of_2(tokens), LOOKUP=lookup.shape[0],
        LAYOUT_ROWS=layouts.offsets.shape[1],
    )


@triton.jit
def _round_inputs(
    carry_ptr, plan_ptr, constants_ptr, out_ptr, stride_carry, stride_plan, batch, max_new,
    TOKENS: tl.constexpr, DMAX: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(carry_ptr + b * stride_carry + 1)
    num_drafts = tl.load(carry_ptr + b * stride_carry + 2)
    valid = tl.load(plan_ptr + 4 * stride_plan + b) != 0
    num_new = tl.where(valid, tl.load(plan_ptr + b), 0)
    branches = tl.load(plan_ptr + stride_plan + b)
    row0 = tl.where(valid, b * TOKENS, 0)
    cache_start = tl.where(valid, start, 0)
    d = tl.minimum(num_drafts, num_new)
    j = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + b * (DMAX + 1) + j, row0 + tl.where(j <= d, j, 0), mask=j <= DMAX)
    drafts_at = batch * (DMAX + 1)
    drafts = tl.load(carry_ptr + b * stride_carry + 3 + tl.minimum(j, max_new - 1), mask=j < DMAX, other=0)
    tl.store(out_ptr + drafts_at + b * DMAX + j, tl.where(j < d, drafts, 0), mask=j < DMAX)
    per_request = drafts_at + batch * DMAX
    main_rows = tl.where(valid, row0 + 1 + d, 0)
    tl.store(out_ptr + per_request + b, d)
    tl.store(out_ptr + per_request + batch + b, num_new)
    tl.store(out_ptr + per_request + 2 * batch + b, tl.minimum(branches, d))
    tl.store(out_ptr + per_request + 3 * batch + b, main_rows)
    tl.store(out_ptr + per_request + 4 * batch + b, main_rows + num_new)
    constants = per_request + 5 * batch
    tl.store(out_ptr + constants + b, tl.load(constants_ptr + b))
    tl.store(out_ptr + constants + batch + b, tl.load(constants_ptr + batch + b))
    tl.store(out_ptr + constants + 2 * batch + b, cache_start)
    tl.store(out_ptr + constants + 3 * batch + b, tl.load(constants_ptr + 2 * batch + b))
    tl.store(out_ptr + constants + 4 * batch + b, tl.load(constants_ptr + 3 * batch + b))


def round_inputs_into(carry: torch.Tensor, plan: torch.Tensor, constants: torch.Tensor, tokens: int, dmax: int,
                      out: torch.Tensor) -> torch.Tensor:
    """round_step.built_round_inputs of SlotState.from_carry(carry, *plan) over a whole bucket
    (carry [bucket, 3 + K], plan [5, bucket], constants [4 * bucket] long; T = tokens, D = dmax)
    written into out (long, round_step.RoundShape.int_sizes() in all); returns out."""
    bucket = carry.shape[0]
    _round_inputs[(bucket,)](
        carry, plan, constants, out, carry.stride(0), plan.stride(0), bucket, carry.shape[1] - 3,
        TOKENS=tokens, DMAX=dmax, BLOCK_D=triton.next_power_of_2(dmax + 1),
    )
    return out
