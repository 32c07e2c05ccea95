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


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose decode joins tokens with spaces, then cleans them up."""
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", clean_up_tokenization_spaces=True)


def test_tokenizers_that_clean_up_spaces_keep_the_full_decode():
    tok = word_tokenizer("a b c d e f g h i j . ? ! , ' n't 'm 's 've 're".split())
    ids = tok.encode("a . b 's c n't d ,", add_special_tokens=False)
    assert tok.decode(ids) != tok.backend_tokenizer.decode(ids)  # this decode does clean up
    detok = IncrementalDetokenizer(tok, [])
    assert detok.stream is None
    assert "".join(run(detok, ids, [1] * len(ids))) == tok.decode(ids, skip_special_tokens=True) == "a. b's cn't d,"


def test_a_probe_that_cannot_tell_keeps_the_full_decode():
    """A vocabulary with none of the clean-up's patterns: the probe decodes to unknowns, so stay safe."""
    assert IncrementalDetokenizer(word_tokenizer(["hello", "world"]), []).stream is None


def test_a_clean_up_setting_that_decode_ignores_streams(byte_tokenizer):
    """transformers 5 skips the clean-up for BPE models whatever the setting says (the SmolLM2 GGUF
    tokenizer has it set under some versions): such a tokenizer streams, and its text is still a
    full decode's."""
    byte_tokenizer.clean_up_tokenization_spaces = True
    try:
        ids = byte_tokenizer.encode("the cat 's mat . naïve , café ! 東京 ?", add_special_tokens=False)
        ignored = byte_tokenizer.decode(ids) == byte_tokenizer.backend_tokenizer.decode(ids)
        detok = IncrementalDetokenizer(byte_tokenizer, [])
        assert (detok.stream is not None) == ignored
        assert "".join(run(detok, ids, [2] * len(ids))) == byte_tokenizer.decode(ids, skip_special_tokens=True)
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


def test_the_default_models_tokenizer_streams_with_the_clean_up_flag_set():
    """What the GPU image's transformers (5.17) sets on SmolLM2's tokenizer: it used to make every step
    decode each whole output (most of a 64-request step's host time on an H200)."""
    from idlm.models.gguf import cached_hf_folder, default_gguf_path
    from idlm.models.tokenizer import load_tokenizer

    tok = load_tokenizer(cached_hf_folder(default_gguf_path()))
    tok.clean_up_tokenization_spaces = True
    text = "Hello , world ! It 's a test . Don't stop ? Grüße aus Köln 😀 and code: x = f(y)\n\tdone"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    assert detok.stream is not None
    assert "".join(run(detok, ids, [1, 3, 2] * len(ids))) == tok.decode(ids, skip_special_tokens=True) == text
