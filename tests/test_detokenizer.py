import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from idlm.engine.detokenizer import IncrementalDetokenizer

CORPUS = ["Grüße aus Köln, 東京 und 😀 emoji", "the cat sat on the mat", "naïve café déjà vu 中文字符"] * 20


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE like SmolLM2's: one character can span several tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", clean_up_tokenization_spaces=False)


def run(detok, ids, chunks):
    """Feeds ids in steps of the given sizes, as the engine does; returns the released pieces."""
    pieces, n = [], 0
    for size in chunks:
        n = min(len(ids), n + size)
        detok.feed(ids[:n], final=n == len(ids))
        pieces.append(detok.release(final=n == len(ids)))
        if detok.stopped or n == len(ids):
            break
    return pieces


@pytest.mark.parametrize("seed", range(20))
def test_streamed_text_equals_a_full_decode(byte_tokenizer, seed):
    rng = random.Random(seed)
    text = rng.choice(CORPUS) + " " + rng.choice(CORPUS)
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    if seed % 2:  # arbitrary ids, including ones that split or break UTF-8 sequences, and the eos
        ids = [rng.randrange(len(byte_tokenizer)) for _ in range(40)]
    detok = IncrementalDetokenizer(byte_tokenizer, [])
    assert detok.stream is not None
    pieces = run(detok, ids, [rng.randint(1, 4) for _ in range(len(ids))])
    # an unfinished character at the very end is dropped (see the next test)
    assert "".join(pieces) == byte_tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    assert all("\ufffd" not in p for p in pieces[:-1]) or seed % 2


def test_stop_string_found_in_the_stream(byte_tokenizer):
    ids = byte_tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer, ["sat on"])
    pieces = run(detok, ids, [1] * len(ids))
    assert detok.stopped and "".join(pieces) == "the cat "


def test_tokenizers_that_clean_up_spaces_keep_the_full_decode(byte_tokenizer):
    byte_tokenizer.clean_up_tokenization_spaces = True
    try:
        assert IncrementalDetokenizer(byte_tokenizer, []).stream is None
    finally:
        byte_tokenizer.clean_up_tokenization_spaces = False


def test_output_cut_inside_a_character_drops_its_bytes(byte_tokenizer):
    """A reply cut by max_tokens in the middle of a multi-byte character ends before it, whole or streamed."""
    ids = byte_tokenizer.encode("Grüße 😀 emoji", add_special_tokens=False)
    cuts = [n for n in range(1, len(ids)) if byte_tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the tokenizer should split the emoji into several tokens"
    for n in cuts:
        expected = byte_tokenizer.decode(ids[:n]).rstrip("\ufffd")
        whole = IncrementalDetokenizer(byte_tokenizer, [])
        whole.feed(ids[:n], final=True)
        assert whole.text == expected and "\ufffd" not in whole.release(final=True)
        streamed = IncrementalDetokenizer(byte_tokenizer, [])
        assert "".join(run(streamed, ids[:n], [1] * n)) == expected
