"""The paged engine: batching, preemption, prefix caching, chunked prefill, stopping rules."""

import pytest
import torch
from helpers import vocab_size

from idlm import LLM, SamplingParams


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size(), (int(k),), generator=gen).tolist()
            for k in torch.randint(lo, hi, (n,), generator=gen)]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), progress=False, kv_cache_tokens=4096)


def alone(llm, prompts, params):
    return [llm.generate([p], params)[0].token_ids for p in prompts]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7, max_tokens=20, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_batch_equals_each_prompt_alone(llm, params):
    prompts = random_prompts(7, seed=3)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    assert batched == alone(llm, prompts, params)


def test_seed_decides_sampling(llm):
    prompt = random_prompts(1, seed=4)[0]
    draw = lambda seed: llm.generate([prompt], SamplingParams(seed=seed, max_tokens=30, ignore_eos=True))[0].token_ids  # noqa: E731
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_small_pool_preempts_and_gives_same_tokens(llama_dir, llm):
    prompts = random_prompts(6, seed=5, lo=20, hi=40)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    tight = LLM(str(llama_dir), progress=False, kv_cache_tokens=160, kv_block_size=8)
    outs = tight.generate(prompts, params)
    assert sum(o.stats["preemptions"] for o in outs) > 0
    assert [o.token_ids for o in outs] == expected
    assert tight.engine.block_manager.num_free == len(tight.engine.block_manager.blocks)


def test_chunked_prefill_equals_whole_prefill(llama_dir, llm):
    prompts = random_prompts(3, seed=6, lo=60, hi=90)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    chunked = LLM(str(llama_dir), progress=False, kv_cache_tokens=4096, max_num_batched_tokens=16)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in chunked.generate(prompts, params)] == expected


def test_all_blocks_free_after_500_requests(llama_dir):
    llm = LLM(str(llama_dir), progress=False, kv_cache_tokens=1024, kv_block_size=8, max_num_seqs=32)
    prompts = random_prompts(500, seed=7, lo=1, hi=30)
    params = [SamplingParams(temperature=0.5 * (i % 3), seed=i, max_tokens=1 + i % 9) for i in range(500)]
    outs = llm.generate(prompts, params)
    assert all(o.finished and o.finish_reason in ("stop", "length") for o in outs)
    bm = llm.engine.block_manager
    assert bm.num_free == len(bm.blocks)
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.has_unfinished()


def test_prefix_caching_reuses_blocks_and_keeps_outputs(llama_dir):
    shared = random_prompts(1, seed=8, lo=50, hi=51)[0]
    prompts = [shared + tail for tail in random_prompts(4, seed=9, lo=3, hi=9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cold = LLM(str(llama_dir), progress=False, kv_cache_tokens=2048, enable_prefix_caching=False)
    warm = LLM(str(llama_dir), progress=False, kv_cache_tokens=2048)
    expected = [o.token_ids for o in cold.generate(prompts, params)]
    first = warm.generate(prompts[:1], params)[0]
    rest = warm.generate(prompts[1:], params)
    assert [first.token_ids] + [o.token_ids for o in rest] == expected
    bm = warm.engine.block_manager
    assert bm.cache_hits >= 3 * (50 // 16)
    assert cold.engine.block_manager.cache_hits == 0


def test_max_tokens_and_eos(llama_dir, llm):
    prompt = random_prompts(1, seed=10)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].token_ids
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free[5]]))[0]
    cut = free.index(free[5]) + 1
    assert out.token_ids == free[:cut] and out.finish_reason == "stop"
    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert short.token_ids == free[:4] and short.finish_reason == "length"
    eos = llm.engine.tokenizer.eos_token_id
    with_eos = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0]
    if eos in free:
        assert with_eos.token_ids == free[:free.index(eos) + 1] and with_eos.finish_reason == "stop"
    else:
        assert with_eos.token_ids == free


def test_stop_strings_are_cut_from_text(llm):
    prompt = "the cat sat on"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    words = free.text.split()
    assert len(words) >= 4
    stop = " ".join(words[2:4])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert stop not in out.text


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "hello world"}], SamplingParams(temperature=0, max_tokens=5))[0]
    expected = llm.tokenizer.encode("<|im_start|>user hello world<|im_end|><|im_start|>assistant",
                                    add_special_tokens=False)
    assert out.prompt_token_ids == expected
