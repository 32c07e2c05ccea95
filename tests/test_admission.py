"""While requests decode, newcomers wait to be prefilled together (Scheduler.admission_due): a prefill
step stalls every running request, so admitted one by one each newcomer cost a step of its own."""

import pytest
from helpers import make_random_adapter, make_small_idlm

from idlm import LLM, SamplingParams
from idlm.config import EngineConfig
from idlm.engine.kv_pool import MAX_LOOKAHEAD
from idlm.engine.scheduler import ADMIT_GROUP

RUNNING = 3 * ADMIT_GROUP  # a group is then 3 newcomers


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model = make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)
    return model, make_random_adapter(model, tmp_path_factory.mktemp("adapter"))


def make_llm(dirs, wait: int, overlap: bool = False) -> LLM:
    model, adapter = dirs
    llm = LLM(str(model), adapter=str(adapter), progress=False, kv_cache_tokens=8192, max_num_seqs=64,
              admit_wait_steps=wait, overlap_scheduling=overlap)
    if overlap:  # the padded decode steps that overlap scheduling launches ahead (as with CUDA graphs)
        engine = llm.engine
        engine.runner.use_padded_decode(64, engine.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
    return llm


def run(llm: LLM, arrivals: dict[int, int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """RUNNING requests, then arrivals[step] newcomers added before that engine step; returns every
    request's tokens (in order added) and (step, requests) of each prefill step."""
    engine = llm.engine
    prefills = []
    step = 0
    engine.scheduler.on_schedule = lambda batch: batch.is_prefill and prefills.append((step, len(batch.seqs)))
    params = [SamplingParams(mode=("ar", "risd")[i % 2], stride=4, temperature=0, max_tokens=30 + i % 3,
                             ignore_eos=True) for i in range(RUNNING + sum(arrivals.values()))]
    ids = [engine.add_request([2 + i % 7, 3, 4 + i % 5], params[i]) for i in range(RUNNING)]
    tokens = {}
    while engine.has_unfinished():
        for _ in range(arrivals.get(step, 0)):
            ids.append(engine.add_request([5, 2 + len(ids) % 9], params[len(ids)]))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        step += 1
    return [tokens[i] for i in ids], prefills


@pytest.mark.parametrize("overlap", [False, True])
def test_newcomers_are_prefilled_together_with_the_same_tokens(dirs, overlap):
    arrivals = {step: 1 for step in range(3, 9)}  # one newcomer a step while RUNNING decode
    at_once, prefills_at_once = run(make_llm(dirs, wait=0, overlap=overlap), arrivals)
    grouped, prefills = run(make_llm(dirs, wait=100, overlap=overlap), arrivals)
    assert grouped == at_once
    # (under overlap a newcomer that arrives while a step is in flight may join the next one's prefill)
    assert overlap or [n for _, n in prefills_at_once] == [RUNNING] + [1] * 6
    assert len(prefills_at_once) >= 5 and [n for _, n in prefills] == [RUNNING, 3, 3]


def test_a_newcomer_alone_waits_admit_wait_steps_decode_steps(dirs):
    _, prefills = run(make_llm(dirs, wait=5), {4: 1})
    assert prefills == [(0, RUNNING), (4 + 5, 1)]  # steps 4-8 decode the others; step 9 is its prefill
    _, prefills = run(make_llm(dirs, wait=0), {4: 1})
    assert prefills == [(0, RUNNING), (4, 1)]


def test_an_idle_engine_admits_at_once(dirs):
    llm = make_llm(dirs, wait=100)
    out = llm.generate([[2, 3, 4]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_admit_wait_steps_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match="admit_wait_steps"):
        EngineConfig(admit_wait_steps=bad).validate()
