"""Gated LoRA for inference on the GPU in one Triton kernel per projection.

`gated_lora_finish` (the engine's path): A is stacked under the base weight, so one cuBLAS GEMM
gives [x W^T | x A^T]; the kernel then adds gate[m] * (x A^T)[m] B^T into the base columns and
writes them out contiguous. It has no loop over in_features: on an H200 the loop of the kernel
below took 6.8 us a call at SmolLM2's decode shapes, 120 calls a step, most of what a risd round
cost beyond an ar step (benchmarks/RESULTS.md, "Real weights after the detokenizer fix").

`gated_lora_add_`, out[m] += gate[m] * (x[m] A^T) B^T from the unwidened weights (deterministic
mode, whose base GEMMs are the fixed-tile kernels of batch_invariant.py, and the oracle checks):

A decode step of a 135M model is a few rows, so each kernel launch costs more than its
arithmetic; in PyTorch the gated delta is three or four launches per projection (x A^T, the gate,
the B GEMM, the add), which doubles a risd round's forward. Here one program takes BLOCK_M rows
and BLOCK_N output columns: it computes the rank-R product of its rows (cheap, recomputed by each
column block) and adds its columns of the delta into `out` in place. Rows whose gate is 0 are
never written, so they stay the base projection's output bit for bit; the PyTorch path of
`GatedLoRA` is the oracle for the rows that are. With invariant=True (deterministic mode) the
row tile is fixed, so a gated row's delta does not depend on how many rows the launch has.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_lora_add(
    x_ptr, a_ptr, b_ptr, gate_ptr, out_ptr,
    rows, in_features, out_features, rank,
    stride_xm, stride_am, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rm < rows
    gate = tl.load(gate_ptr + rm, mask=row_ok, other=0.0).to(tl.float32)
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=row_ok[:, None] & (rk[None, :] < in_features), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :],
                    mask=(rr[:, None] < rank) & (rk[None, :] < in_features), other=0.0)
        low += tl.dot(x, tl.trans(a), input_precision=PRECISION)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :],
                mask=(rn[:, None] < out_features) & (rr[None, :] < rank), other=0.0)
    low = (low * gate[:, None]).to(b.dtype)
    delta = tl.dot(low, tl.trans(b), input_precision=PRECISION)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    write = (row_ok & (gate != 0))[:, None] & (rn[None, :] < out_features)
    base = tl.load(out_ptrs, mask=write, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + delta).to(base.dtype), mask=write)


@triton.jit
def _gated_lora_finish(
    wide_ptr, b_ptr, gate_ptr, out_ptr,
    rows, out_features, rank,
    stride_wm, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rm < rows
    col_ok = rn < out_features
    gate = tl.load(gate_ptr + rm, mask=row_ok, other=0.0).to(tl.float32)
    # the low-rank product sits right of the base columns in each row of the wide output
    low = tl.load(wide_ptr + rm[:, None] * stride_wm + out_features + rr[None, :],
                  mask=row_ok[:, None] & (rr[None, :] < rank), other=0.0)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :],
                mask=col_ok[:, None] & (rr[None, :] < rank), other=0.0)
    low = (low.to(tl.float32) * gate[:, None]).to(b.dtype)
    delta = tl.dot(low, tl.trans(b), input_precision=PRECISION)
    both = row_ok[:, None] & col_ok[None, :]
    base = tl.load(wide_ptr + rm[:, None] * stride_wm + rn[None, :], mask=both, other=0.0)
    gated = (gate != 0)[:, None]
    result = tl.where(gated, (base.to(tl.float32) + delta).to(base.dtype), base)  # ungated rows: base, bit for bit
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], result, mask=both)


def gated_lora_finish(wide: torch.Tensor, fused_b: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """wide [..., out + R]: x [W; A]^T (+ bias, 0 on the R columns); fused_b [out, R] (scaled);
    gate [...] of 0/1. Returns the projection [..., out], contiguous: the base columns, plus
    gate * (x A^T) B^T on gated rows."""
    out_features, rank = fused_b.shape
    lead = wide.shape[:-1]
    w2 = wide.reshape(-1, wide.shape[-1])
    assert w2.stride(-1) == 1 and w2.shape[1] == out_features + rank
    rows = w2.shape[0]
    out = torch.empty(rows, out_features, dtype=wide.dtype, device=wide.device)
    if rows:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_n = 64
        grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
        _gated_lora_finish[grid](
            w2, fused_b, gate.reshape(-1), out,
            rows, out_features, rank,
            w2.stride(0), fused_b.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)),
            PRECISION="ieee" if wide.dtype == torch.float32 else "tf32",
            num_warps=4,
        )
    return out.view(*lead, out_features)


INVARIANT_BLOCK_M = 32


def gated_lora_add_(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, fused_b: torch.Tensor,
                    gate: torch.Tensor, invariant: bool = False) -> torch.Tensor:
    """Adds the gated delta into out ([..., out_features], contiguous) in place and returns it.
    x [..., in_features]; lora_a [R, in]; fused_b [out, R] (scaled); gate [...] of 0/1."""
    x2 = x.reshape(-1, x.shape[-1])
    assert out.is_contiguous(), "the delta is added into a contiguous output"
    out2 = out.view(-1, out.shape[-1])
    gate = gate.reshape(-1)
    rows, in_features = x2.shape
    out_features, rank = fused_b.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_m = INVARIANT_BLOCK_M if invariant else 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _gated_lora_add[grid](
        x2, lora_a, fused_b, gate, out2,
        rows, in_features, out_features, rank,
        x2.stride(0), lora_a.stride(0), fused_b.stride(0), out2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


# gate_up's gated delta folded into its consumer, silu_mul, so that projection spends no launch of
# its own on the delta (a launch costs ~3 us of an H200's graph replay whatever its size; a risd
# step had 120 finish launches, 0.5 ms of 2.5 at C = 64). The projection is rounded as
# gated_lora_finish rounds it (bf16(base + delta) on gated rows, the base on the others) before
# silu_mul. The other projections keep the finish kernel: folding o's and down's into the add +
# norm after them made that kernel slower than finish + the compiled norm (it must hold whole rows,
# so it gets few programs), and qkv's consumer (triton_rope_kv) works a row at a time
# (benchmarks/RESULTS.md, "The gated delta in its consumer").


@triton.jit
def _gated_silu_mul(
    wide_ptr, b_ptr, gate_ptr, out_ptr,
    rows, inter, rank,
    stride_wm, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < rows
    col_ok = rn < inter
    both = row_ok[:, None] & col_ok[None, :]
    w_row = wide_ptr + rm[:, None] * stride_wm
    # wide row: [act (inter) | up (inter) | x A_act^T (rank) | x A_up^T (rank)]; fused_B is
    # block-diagonal: act columns take B[:, :rank], up columns B[inter:, rank:2 rank]
    act = tl.load(w_row + rn[None, :], mask=both, other=0.0)
    up = tl.load(w_row + inter + rn[None, :], mask=both, other=0.0)
    if HAS_GATE:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        gate = tl.load(gate_ptr + rm, mask=row_ok, other=0.0).to(tl.float32)
        gated = (gate != 0)[:, None]
        low_act = tl.load(w_row + 2 * inter + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        low_up = tl.load(w_row + 2 * inter + rank + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b_act = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=col_ok[:, None] & r_ok[None, :],
                        other=0.0)
        b_up = tl.load(b_ptr + (inter + rn[:, None]) * stride_bn + rank + rr[None, :],
                       mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        delta_act = tl.dot((low_act.to(tl.float32) * gate[:, None]).to(b_act.dtype), tl.trans(b_act),
                           input_precision=PRECISION)
        delta_up = tl.dot((low_up.to(tl.float32) * gate[:, None]).to(b_up.dtype), tl.trans(b_up),
                          input_precision=PRECISION)
        act = tl.where(gated, (act.to(tl.float32) + delta_act).to(act.dtype), act)
        up = tl.where(gated, (up.to(tl.float32) + delta_up).to(up.dtype), up)
    act = act.to(tl.float32)
    out = act / (1.0 + tl.exp(-act)) * up.to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=both)


def gated_silu_mul(wide: torch.Tensor, fused_b: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """silu(act) * up of a fused gate_up projection whose two shards' gated deltas are still to be
    added: wide [..., 2 I + 2 R] = x [W_act; W_up; A_act; A_up]^T, fused_b [2 I, 2 R] block-diagonal
    (scaled), gate [...] of 0/1, or None for a step without gated rows (the bits of a gated
    step's ungated rows). Returns [..., I]."""
    out2, rank2 = fused_b.shape
    inter, rank = out2 // 2, rank2 // 2
    lead = wide.shape[:-1]
    w2 = wide.reshape(-1, wide.shape[-1])
    assert w2.stride(-1) == 1 and w2.shape[1] == out2 + rank2
    rows = w2.shape[0]
    out = torch.empty(rows, inter, dtype=wide.dtype, device=wide.device)
    if rows:
        block_m = 16 if rows <= 16 else 32
        grid = (triton.cdiv(rows, block_m), triton.cdiv(inter, 64))
        _gated_silu_mul[grid](
            w2, fused_b, fused_b if gate is None else gate.reshape(-1), out, rows, inter, rank,
            w2.stride(0), fused_b.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=max(16, triton.next_power_of_2(rank)),
            PRECISION="ieee" if wide.dtype == torch.float32 else "tf32", num_warps=4, HAS_GATE=gate is not None,
        )
    return out.view(*lead, inter)
