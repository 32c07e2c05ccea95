"""Structured output: a JSON schema compiled by xgrammar into a token mask per position.

ISD stays exact when p and q of a position are masked by the grammar's state after that
position's own history (committed tokens, then the drafts before it): the runner asks
`Constraint.bitmask` for the masks of a round's rows and advances the matcher speculatively,
rolling back what was not committed."""

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_CACHED = 64  # compiled schemas kept
MAX_WHITESPACE = 8  # a run of whitespace the grammar allows between JSON tokens (a random model loops on it)


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError("structured output (response_format) needs xgrammar: pip install 'idlm[structured]'") from e
    return xgrammar


class Grammars:
    """Compiles schemas for one tokenizer; compiled grammars are cached by schema text."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.compiler = None
        self.lock = threading.Lock()  # the server compiles on its tokenizer threads and the engine thread
        self.compiled: OrderedDict[str, object] = OrderedDict()  # schema text -> checked compiled grammar

    def compile(self, schema: str):
        """The compiled grammar of a JSON schema (text); ValueError for an invalid one."""
        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer; this model has none")
        xgr = _xgrammar()
        with self.lock:
            if schema in self.compiled:
                self.compiled.move_to_end(schema)
                return self.compiled[schema]
            if self.compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_ids)
                self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        try:
            json.loads(schema)
            compiled = self.compiler.compile_json_schema(schema, any_whitespace=True,
                                                         max_whitespace_cnt=MAX_WHITESPACE)
        except Exception as e:  # xgrammar raises RuntimeError and its own errors for bad schemas
            raise ValueError(f"response_format: the JSON schema cannot be compiled ({str(e).splitlines()[0]})") from e
        start = Constraint(xgr.GrammarMatcher(compiled), self.vocab_size, self.stop_ids).bitmask([])
        if not allowed(start, self.vocab_size, []).any():
            raise ValueError("response_format: no token of this model's vocabulary can start that JSON")
        with self.lock:
            self.compiled[schema] = compiled
            if len(self.compiled) > MAX_CACHED:
                self.compiled.popitem(last=False)
        return compiled

    def constraint(self, schema: str) -> "Constraint":
        return Constraint(_xgrammar().GrammarMatcher(self.compile(schema)), self.vocab_size, self.stop_ids)


@dataclass
class Constraint:
    """One request's grammar state, at its committed tokens."""

    matcher: object  # xgrammar.GrammarMatcher
    vocab_size: int
    stop_ids: list[int]

    def accept(self, token: int) -> None:
        """A committed token (the engine only commits tokens the masks allowed)."""
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    def bitmask(self, tokens: list[int]) -> torch.Tensor:
        """xgrammar's int32 bitmask [len(tokens) + 1, ceil(V / 32)] of the tokens allowed after the
        committed ones and after each prefix of `tokens` (all allowed once the grammar has ended);
        `allowed` unpacks it. The state is left unchanged."""
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(len(tokens) + 1, self.vocab_size)
        taken, ended = 0, False
        for i in range(len(tokens) + 1):
            ended = ended or self.matcher.is_terminated()
            if ended:
                bitmask[i] = -1
            else:
                self.matcher.fill_next_token_bitmask(bitmask, i)
            if i < len(tokens) and not ended:
                if not self.matcher.accept_token(tokens[i]):
                    ended = True  # a token the grammar refuses is never committed; what follows it is moot
                    continue
                taken += 1
        if taken:
            self.matcher.rollback(taken)
        return bitmask

    def try_tokens(self, tokens: list[int]) -> int:
        """Advances over tokens speculatively; returns how many to roll back."""
        taken = 0
        for token in tokens:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                break
            taken += 1
        return taken

    def rollback(self, taken: int) -> None:
        if taken:
            self.matcher.rollback(taken)


def allowed(bitmask: torch.Tensor, vocab: int, stop_ids: list[int]) -> torch.Tensor:
    """Bitmasks [rows, ceil(V / 32)] (on any device) as bool [rows, V]. Where the vocabulary cannot
    continue the grammar, the stop tokens are allowed, so the output ends there instead of drawing
    from nothing."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    mask = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]
    stuck = ~mask.any(dim=1, keepdim=True)
    stops = torch.zeros(vocab, dtype=torch.bool, device=mask.device)
    stops[stop_ids] = True
    return mask | (stuck & stops)
