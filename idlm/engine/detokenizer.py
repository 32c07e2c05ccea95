import weakref

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

# transformers' clean-up of spaces rewrites these; a probe that decodes to none of them cannot tell
CLEAN_UP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're"
CLEAN_UP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_plain_decode: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, bool]" = weakref.WeakKeyDictionary()


def decodes_plainly(tokenizer: PreTrainedTokenizerBase, backend) -> bool:
    """Whether tokenizer.decode returns its Rust backend's decode unchanged. A set
    clean_up_tokenization_spaces does not say: transformers 5 skips that clean-up for BPE models
    (SmolLM2's GGUF tokenizer has it set on some versions), so a probe decides, once per tokenizer."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return True
    try:
        return _plain_decode[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = tokenizer.encode(CLEAN_UP_PROBE, add_special_tokens=False)
    raw = backend.decode(ids, skip_special_tokens=True)
    plain = any(p in raw for p in CLEAN_UP_PATTERNS) and tokenizer.decode(ids, skip_special_tokens=True) == raw
    try:
        _plain_decode[tokenizer] = plain
    except TypeError:  # (not weak-referenceable: probed again next time)
        pass
    return plain


class IncrementalDetokenizer:
    """Text of a growing token list, released only when it is final: never half a UTF-8
    character (an output that ends inside one, cut by max_tokens, drops those bytes), and never the
    first characters of what may still become a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False
        # Decoding the whole output at every step costs O(length) per step and sequence (~100 us
        # for 200 SmolLM2 tokens: most of a 64-request step's host time on the H200); the Rust
        # tokenizer's stream decodes only the new ids. Its text equals a full decode unless the
        # tokenizer rewrites spaces afterwards, so those tokenizers keep the full decode.
        backend = getattr(tokenizer, "_tokenizer", None)
        streamable = backend is not None and decodes_plainly(tokenizer, backend)
        self.backend = backend if streamable else None
        self.stream = DecodeStream(skip_special_tokens=True) if streamable else None
        self.streamed = ""
        self.num_fed = 0

    def feed(self, token_ids: list[int], final: bool, start: int = 0) -> None:
        """Feed the whole output so far, token_ids[start:] (start skips a prompt without copying
        the list); finds stop strings."""
        if self.tokenizer is None or self.stopped:
            return
        if self.stream is not None and not final:
            for token in token_ids[start + self.num_fed:]:
                self.streamed += self.stream.step(self.backend, token) or ""
            self.num_fed = len(token_ids) - start
            self._find_stop(self.streamed)
            return
        text = self.tokenizer.decode(token_ids[start:], skip_special_tokens=True)  # once per request when streaming
        if text.endswith("\ufffd"):
            # the first bytes of a character the tokens do not finish (yet, or ever, when the output
            # ends there): never part of the text, streamed or whole
            text = text.rstrip("\ufffd") if final else self.text
        self._find_stop(text)

    def release(self, final: bool) -> str:
        """Text that became final since the last release."""
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.holdback)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new

    def _find_stop(self, text: str) -> None:
        start = max(0, len(self.text) - self.holdback)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            self.stopped = True
        else:
            self.text = text
