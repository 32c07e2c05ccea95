"""The quantised CPU path: GGUF blocks, the int4 kernel against a dequantise-then-matmul
reference, row invariance (and a GEMM that breaks it), dtype/quantisation selection, and exact
decoding (risd/isd == ar, batched == alone, seeded sampling) on quantised models."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_model, make_random_adapter, make_small_idlm, paged_batch, vocab_size

from idlm import LLM, SamplingParams
from idlm.kernels import cpu_gemm
from idlm.kernels.cpu_gemm import RowTiledLinear
from idlm.kernels.row_attention import RowExactPagedAttention
from idlm.models import loader
from idlm.models.gguf import QUANT_CACHE, default_gguf_path
from idlm.models.loader import cpu_kernel
from idlm.models.quant import (
    FORMATS,
    GroupQuant,
    QuantEmbedding,
    QuantLinear,
    from_gguf_blocks,
    quantize,
    to_gguf_blocks,
)


def rows_invariant(fn, x: torch.Tensor) -> bool:
    """Also each row alone gives the bits it has in the middle of the batch."""
    full = fn(x)
    return cpu_gemm.rows_invariant(fn, x) and all(torch.equal(fn(x[i:i + 1])[0], full[i]) for i in range(len(x)))


def split_k_when_batched(w: torch.Tensor):
    """A GEMM whose reduction order depends on the number of rows (as BLAS tails do)."""
    def gemm(x: torch.Tensor) -> torch.Tensor:
        if len(x) < 4:
            return x @ w.t()
        half = w.shape[1] // 2
        return x[:, :half] @ w[:, :half].t() + x[:, half:] @ w[:, half:].t()
    return gemm


# ---------------------------------------------------------------- formats and kernels


@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_blocks_round_trip_and_match_llama_cpp(fmt):
    w = np.random.default_rng(0).standard_normal((48, 160)).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    blocks = gguf.quants.quantize(w, qtype)
    gq = from_gguf_blocks(fmt, blocks, w.shape)
    assert np.array_equal(to_gguf_blocks(gq), blocks.reshape(48, -1))  # bit for bit
    assert np.array_equal(gq.dequantize().numpy(), gguf.quants.dequantize(blocks, qtype).reshape(w.shape))
    assert np.array_equal(to_gguf_blocks(quantize(torch.from_numpy(w), fmt)), blocks.reshape(48, -1))


def test_default_gguf_blocks_round_trip():
    reader = gguf.GGUFReader(default_gguf_path())
    for t in [t for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight")]:
        shape = tuple(int(d) for d in reversed(t.shape))
        gq = from_gguf_blocks(t.tensor_type.name, t.data, shape)
        assert np.array_equal(to_gguf_blocks(gq), np.asarray(t.data).reshape(shape[0], -1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_int4_packing_recovers_the_codes(fmt):
    """Unit scales through the packed kernel against the identity: out = codes, exactly."""
    gen = torch.Generator().manual_seed(1)
    n, k = 40, 96
    if fmt == "Q8_0":
        codes = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
        gq = GroupQuant(fmt, codes, torch.ones(n, k // 32), None)
    else:
        codes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
        gq = GroupQuant(fmt, codes, torch.ones(n, k // 32), torch.zeros(n, k // 32))
    out = QuantLinear(gq)(torch.eye(k))
    assert torch.equal(out.t(), codes.float())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(40, 96), (17, 32), (130, 160), (16, 64)])
def test_quant_linear_matches_dequantised_reference(fmt, n, k):
    gen = torch.Generator().manual_seed(n * k)
    gq = quantize(torch.randn(n, k, generator=gen), fmt)
    bias = torch.randn(n, generator=gen)
    layer = QuantLinear(gq, bias)
    for m in (1, 3, 17):
        x = torch.randn(2, m, k, generator=gen)
        ref = F.linear(x, gq.dequantize(), bias)
        out = layer(x)
        assert out.shape == ref.shape and out.dtype == x.dtype
        # the kernel takes x as bfloat16 and rounds its output to bfloat16
        assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_embedding_rows_equal_the_dequantised_table(fmt):
    gq = quantize(torch.randn(50, 64, generator=torch.Generator().manual_seed(9)), fmt)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(QuantEmbedding(gq, torch.float32)(ids), gq.dequantize()[ids])


def test_invariance_check_fails_for_a_gemm_whose_result_depends_on_m():
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(1))
    assert not rows_invariant(split_k_when_batched(w), x)
    assert rows_invariant(lambda a: torch.stack([r @ w.t() for r in a]), x)  # one row at a time passes


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_is_row_invariant(fmt):
    gen = torch.Generator().manual_seed(2)
    layer = QuantLinear(quantize(torch.randn(960, 576, generator=gen), fmt))
    assert rows_invariant(layer, torch.randn(40, 576, generator=gen))
    big = torch.randn(300, 576, generator=gen)
    assert torch.equal(layer(big[:1]), layer(big)[:1])


def test_head_gemm_is_row_invariant():
    gen = torch.Generator().manual_seed(3)
    head = RowTiledLinear(576, 49152, bias=False)
    torch.nn.init.normal_(head.weight, generator=gen)
    x = torch.randn(20, 576, generator=gen)
    for layout in ("row-major", "column-major"):  # column-major: how the engine stores the head on the CPU
        if layout == "column-major":
            head.weight.data = head.weight.data.t().contiguous().t()
        head.prepare()
        assert rows_invariant(head, x)
        big = torch.randn(256, 576, generator=gen)
        assert torch.equal(head(big)[:5], head(big[:5]))


def test_head_without_a_packed_onednn_weight_runs_on_blas_and_keeps_its_table(monkeypatch):
    """oneDNN packs bfloat16 only with AVX-512 (or AVX-NE-CONVERT): `--dtype bfloat16` on an AVX2 CPU
    raised from the head's packing and the engine never started."""
    def unsupported(*args):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", unsupported)
    gen = torch.Generator().manual_seed(4)
    head = RowTiledLinear(64, 300, bias=False)
    torch.nn.init.normal_(head.weight, generator=gen)
    head.prepare()
    head.drop_float_weight()  # (nothing to drop to: BLAS reads the table)
    x = torch.randn(6, 64, generator=gen)
    assert head.packed is None and not head.weight.is_meta
    assert rows_invariant(head, x) and torch.allclose(head(x), x @ head.weight.t(), atol=1e-5)


def test_calibration_rejects_tiles_that_break_invariance():
    """With a GEMM that computes tails of fewer than 8 rows its own way, tile 8 is chosen."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))

    def linear(x, weight, bias=None):
        full = len(x) - len(x) % 8
        tiles = [x[i:i + 8] @ weight.t() for i in range(0, full, 8)]
        tail = [split_k_when_batched(weight)(x[full:])] if len(x) > full else []
        return torch.cat(tiles + tail)

    assert cpu_gemm.smallest_invariant_tile(lambda a: linear(a, w), 96, torch.float32) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 32])  # a softmax scale of 1/8 (scaling q is exact) and of 1/sqrt(32) (is not)
def test_row_exact_attention_does_not_depend_on_batch_mates(dtype, dim):
    gen = torch.Generator().manual_seed(4)
    block, heads, kv_heads = 16, 9, 3
    cache = torch.randn(2, 1, 40, block, kv_heads, dim, generator=gen).to(dtype)
    q_rows = torch.randn(60, heads, dim, generator=gen).to(dtype)

    def run(seqs: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """seqs: (context length after the writes, new rows, block table)."""
        batch = paged_batch(seqs, block)
        kv = cache.clone()
        new_k = kv[0, 0].view(-1, kv_heads, dim)[batch.slot_mapping]
        q = torch.cat([q_rows[:rows] for _, rows, _ in seqs])
        return RowExactPagedAttention(kv, batch)(0, q, new_k, new_k.clone())

    alone = run([(45, 1, [3, 4, 5])])  # an ar step: the pending row at position 44
    in_round = run([(51, 7, [3, 4, 5, 6])])  # the same row first of a 7-row round
    batched = run([(130, 1, [10, 11, 12, 13, 14, 15, 16, 17, 18]), (51, 7, [3, 4, 5, 6])])
    assert torch.equal(alone[0], in_round[0])
    assert torch.equal(alone[0], batched[1])
    # and each row is causal attention over its own keys (SDPA over the same cache as reference)
    ctx, rows = 51, 7
    keys = cache[0, 0, 3:7].reshape(-1, kv_heads, dim)[:ctx].transpose(0, 1).float()
    values = cache[1, 0, 3:7].reshape(-1, kv_heads, dim)[:ctx].transpose(0, 1).float()
    values[:, ctx - rows:] = keys[:, ctx - rows:]  # run() writes the new rows' k as their v
    reference = F.scaled_dot_product_attention(q_rows[:rows].float().transpose(0, 1)[None], keys[None], values[None],
                                               attn_mask=torch.ones(rows, ctx, dtype=torch.bool).tril(ctx - rows),
                                               enable_gqa=True)[0].transpose(0, 1)
    tolerance = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(in_round.float(), reference, **tolerance)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("bf16", [True, False])
def test_dtype_selection(monkeypatch, bf16, kernels):
    """Quantised weights run bfloat16 activations only on a bfloat16 CPU without idlm's kernels."""
    from idlm.kernels import group_gemm

    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(group_gemm, "group_gemm_module", lambda: object() if kernels else None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader.auto_dtype(cpu, "gguf") == ("bfloat16" if bf16 and not kernels else "float32")
    assert loader.auto_dtype(cpu, "int4") == ("bfloat16" if bf16 and not kernels else "float32")
    assert loader.auto_dtype(cpu, "none") == "float32"
    assert loader.auto_dtype(cuda, "none") == "bfloat16"


@pytest.mark.parametrize("amx,avx512_bf16", [(True, False), (False, True), (False, False)])
def test_cpu_feature_probe(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert loader.cpu_has_bf16() == (amx or avx512_bf16)


def test_quantization_selection(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader.resolve_quantization(None, "auto", cpu) == "gguf"  # the embedded Q4_1 file
    assert loader.resolve_quantization(None, "auto", cuda) == "none"
    assert loader.resolve_quantization(str(tmp_path), "auto", cpu) == "none"  # a safetensors folder
    assert loader.resolve_quantization(str(tmp_path), "int8", cpu) == "int8"
    with pytest.raises(ValueError, match="not a .gguf file"):
        loader.resolve_quantization(str(tmp_path), "gguf", cpu)
    with pytest.raises(ValueError, match="CPU only"):
        loader.resolve_quantization(None, "int4", cuda)
    with pytest.raises(ValueError, match="choose one of"):
        loader.resolve_quantization(None, "int3", cpu)


def test_unsupported_gguf_type_says_what_to_do(tmp_path):
    path = tmp_path / "k_quant.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {"embedding_length": 32, "attention.head_count": 4, "feed_forward_length": 64,
                       "block_count": 1, "context_length": 64, "vocab_size": 8}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    q2k = np.zeros((32, 84), dtype=np.uint8)  # one Q2_K super-block per row of 256 weights
    writer.add_tensor("blk.0.attn_q.weight", q2k, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from idlm.models.gguf import is_quantized, quantized_tensors

    assert not is_quantized(path)
    with pytest.raises(ValueError, match="Q2_K.*Q4_0, Q4_1, Q8_0.*--quantization none"):
        quantized_tensors(path)


# ---------------------------------------------------------------- exact decoding, quantised


def prompts_for(n: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab - 1, (int(k),), generator=gen).tolist()
            for k in torch.randint(1, 30, (n,), generator=gen)]


@pytest.fixture(scope="module")
def quant_idlm(tmp_path_factory):
    folder = make_small_idlm(tmp_path_factory.mktemp("qidlm"), spread=0.25, vocab=12)
    adapter = make_random_adapter(folder, tmp_path_factory.mktemp("qadapter"))
    return {fmt: LLM(str(folder), adapter=str(adapter), quantization=fmt, progress=False, kv_cache_tokens=4096)
            for fmt in ("int4", "int8")}


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantised_greedy_isd_risd_equal_ar_and_batched_equals_alone(quant_idlm, fmt):
    llm = quant_idlm[fmt]
    assert isinstance(llm.engine.model.model.layers[0].mlp.down_proj, QuantLinear)
    prompts = prompts_for(12, 12, seed=5)
    greedy = dict(temperature=0, max_tokens=32, ignore_eos=True)
    alone = [llm.generate([p], SamplingParams(mode="ar", **greedy))[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))] == alone
    for mode in ("isd", "risd"):
        for stride in (2, 4):
            outs = llm.generate(prompts, SamplingParams(mode=mode, stride=stride, stride_policy="fixed", **greedy))
            assert [o.token_ids for o in outs] == alone
        assert sum(o.stats["drafts"]["accepted"][0] for o in outs) > 0


def head_inputs(llm: LLM, prompts: list[list[int]], params: SamplingParams, batched: bool) -> set[bytes]:
    """The bits of every row the head saw."""
    rows: list[torch.Tensor] = []
    hook = llm.engine.model.lm_head.register_forward_hook(
        lambda module, args, out: rows.extend(args[0].reshape(-1, args[0].shape[-1])))
    try:
        if batched:
            llm.generate(prompts, params)
        else:
            for p in prompts:
                llm.generate([p], params)
    finally:
        hook.remove()
    return {r.float().numpy().tobytes() for r in rows}


def test_quantised_rows_are_bit_identical_alone_batched_and_in_rounds(quant_idlm):
    """Stronger than equal tokens: every hidden row an ar request alone gives its head recurs bit
    for bit when it runs in a batch and when it runs as risd rounds."""
    assert_rows_invariant(quant_idlm["int4"])


def assert_rows_invariant(llm: LLM) -> None:
    """Every hidden row of 8 ar requests alone recurs bit for bit batched, and in risd rounds."""
    prompts = prompts_for(8, 12, seed=8)
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    alone = head_inputs(llm, prompts, SamplingParams(mode="ar", **greedy), batched=False)
    assert alone <= head_inputs(llm, prompts, SamplingParams(mode="ar", **greedy), batched=True)
    risd = SamplingParams(mode="risd", stride=4, stride_policy="fixed", **greedy)
    assert alone <= head_inputs(llm, prompts, risd, batched=True)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_cpu_stack_is_the_python_forward(quant_idlm, fmt):
    """The layers as one C++ call (models/cpu_stack.py) give the head the bits the Python layers give
    it, in ar steps, risd rounds (the gated LoRA on) and seeded sampling."""
    llm = quant_idlm[fmt]
    model = llm.engine.model
    if model.model.norm.weight.dtype != torch.float32 or cpu_kernel("Q4_1", torch.float32) != "group":
        pytest.skip("the CPU stack runs float32 activations on idlm's kernels")
    stack = model.cpu_stack
    assert stack is not None
    prompts = prompts_for(5, 12, seed=9)
    runs = [SamplingParams(mode="ar", temperature=0, max_tokens=16, ignore_eos=True),
            SamplingParams(mode="risd", stride=4, stride_policy="fixed", temperature=0, max_tokens=16, ignore_eos=True),
            SamplingParams(mode="risd", temperature=0.8, seed=2, max_tokens=16, ignore_eos=True)]
    calls, real = [], stack.stack

    class Counted:
        def forward(self, *args):
            calls.append(1)
            return real.forward(*args)

    stack.stack = Counted()
    try:
        with_stack = [head_inputs(llm, prompts, params, batched=True) for params in runs]
        outs = [[o.token_ids for o in llm.generate(prompts, params)] for params in runs]
    finally:
        stack.stack = real
    assert calls
    model.cpu_stack = None
    try:
        assert [head_inputs(llm, prompts, params, batched=True) for params in runs] == with_stack
        assert [[o.token_ids for o in llm.generate(prompts, params)] for params in runs] == outs
    finally:
        model.cpu_stack = stack


def test_quantised_seeded_sampling_is_batch_invariant(quant_idlm):
    llm = quant_idlm["int4"]
    prompts = prompts_for(6, 12, seed=6)
    params = [SamplingParams(mode=mode, temperature=0.8, top_p=0.9, seed=i, max_tokens=24, ignore_eos=True)
              for i, mode in enumerate(["ar", "risd", "isd"] * 2)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


def test_quantised_qwen2_with_biases_risd_equals_ar(tmp_path):
    make_model(tmp_path, "qwen2")
    llm = LLM(str(tmp_path), quantization="int4", progress=False, kv_cache_tokens=1024)
    prompts = prompts_for(4, vocab_size(), seed=7)
    greedy = dict(temperature=0, max_tokens=16, ignore_eos=True)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))]
    assert [llm.generate([p], SamplingParams(mode="risd", stride=3, **greedy))[0].token_ids for p in prompts] == ar


CHATS = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colours."]


def test_default_model_runs_quantised_and_risd_equals_ar():
    llm = LLM(progress=False)
    assert llm.engine.quantization == "gguf"
    assert llm.engine.model.model.layers[0].self_attn.qkv_proj.fmt == "Q4_1"
    # the cache entry holds the decoded blocks, out of a float loader's way, and no float weights beside them
    assert (llm.engine.folder / QUANT_CACHE).is_file() and not list(llm.engine.folder.glob("*.safetensors"))
    # the tied table: lookups dequantise its Q8_0 rows; the head runs on the same codes through the
    # group GEMM where it builds (float32 activations), else it keeps only its packed float copy
    model = llm.engine.model
    if cpu_kernel("Q8_0", model.model.embed_tokens.dtype) == "group":
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.kernel == "group"
        assert model.lm_head.codes is model.model.embed_tokens.codes
    else:
        assert model.lm_head.weight.is_meta and model.lm_head.packed is not None
    table = next(t for t in gguf.GGUFReader(default_gguf_path()).tensors if t.name == "token_embd.weight")
    rows = torch.tensor([0, 2, 17, 49151])
    full = gguf.quants.dequantize(np.asarray(table.data)[rows.numpy()], table.tensor_type)
    assert torch.equal(model.model.embed_tokens(rows), torch.from_numpy(full).to(model.model.embed_tokens.dtype))
    ids = [llm.engine.chat_prompt([{"role": "user", "content": c}]) for c in CHATS]
    greedy = dict(temperature=0, max_tokens=24)
    ar = [llm.generate([x], SamplingParams(mode="ar", **greedy))[0] for x in ids]
    # (not the France answer: its top two logits are 0.03 apart in float32, under bfloat16's
    # resolution there, and CPUs with AVX-512 BF16 or AMX run the default in bfloat16)
    assert "The primary colours are" in ar[2].text and "Red" in ar[2].text, ar[2].text
    risd = llm.generate(ids, SamplingParams(mode="risd", **greedy))
    assert [o.token_ids for o in risd] == [o.token_ids for o in ar]


@pytest.mark.parametrize("in_features, out_sizes", [(576, [576, 192, 192]), (576, [1536, 1536]), (1536, [576])])
def test_gated_lora_delta_of_a_row_is_the_same_bits_alone_and_batched(in_features, out_sizes):
    """A sampled risd request's drafts come from its MASK rows, so their gated delta must not depend
    on the rows beside it, or a seeded request draws other tokens in a batch. oneDNN's bfloat16 GEMM
    (the CPU's activations where it has AVX-512 BF16 or AMX) is row-invariant at SmolLM2's shapes.
    (A float32 delta would be 3x cheaper a call at one row, but float32 F.linear is not: its raw
    outputs differed in 11 of 12 row sets on this CPU, which after rounding to bfloat16 shows only
    now and then, so this test would not reliably catch it; the delta stays bfloat16.)"""
    from idlm.models.lora import GatedLoRA

    gen = torch.Generator().manual_seed(in_features)
    lora = GatedLoRA(in_features, out_sizes, 16, 2.0)
    with torch.no_grad():
        lora.lora_A.copy_(torch.randn(lora.lora_A.shape, generator=gen) / 10)
        for b in lora.lora_B:
            b.copy_(torch.randn(b.shape, generator=gen) / 10)
    lora = lora.to(torch.bfloat16)
    lora.fuse_for_inference()
    x = torch.randn(16, in_features, generator=gen).bfloat16()
    out = torch.randn(16, sum(out_sizes), generator=gen).bfloat16()
    gate = (torch.arange(16) % 3 > 0).float()
    full = lora.add_to(out, x, gate)
    for rows in (slice(0, 1), slice(4, 5), slice(0, 3), slice(5, 12)):
        assert torch.equal(lora.add_to(out[rows], x[rows], gate[rows]), full[rows])
    assert torch.equal(full[gate == 0], out[gate == 0])  # ungated rows are the base's, bit for bit


def test_row_exact_cpu_engines_keep_a_float32_kv_cache(quant_idlm):
    """The row-exact attention reads K/V in float32: the cache holds them so (bfloat16 widens
    exactly), converted once when written rather than every step for every row's context."""
    engine = quant_idlm["int4"].engine
    assert engine.runner.kv_cache.dtype == torch.float32
    assert engine.runner.dtype == next(engine.model.parameters()).dtype
