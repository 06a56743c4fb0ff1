"""Grammar-constrained decoding (vLLM's structured output) over xgrammar.

The engine owns one StructuredOutputManager, built when the engine starts: the vocabulary as xgrammar
sees it and its GrammarCompiler, compiled grammars cached per schema, and a small thread pool that
compiles grammars off the step loop. A request's schema is checked when it arrives (parsing is cheap,
so a bad schema is rejected at once); its grammar is compiled on the pool and the request waits,
unscheduled, until it is ready (vLLM's WAITING_FOR_FSM). The model runner holds a RequestGrammar (one
GrammarMatcher) per constrained request. Per step it fills a token bitmask for the constrained rows only
and masks their logits to -inf before sampling, then feeds each sampled token to its matcher. A
preempted request keeps its runner state (recompute rebuilds KV, not outputs), so its matcher stays in
step; a request the runner first sees with output tokens (a decode engine taking a prefilled request)
replays them.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future

import torch
import xgrammar as xgr

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.sampling_params import StructuredOutputParams

# Distinct schemas kept compiled; a service sees few, and recompiling an evicted one is cheap.
MAX_CACHED_GRAMMARS = 64
# xgrammar prefixes its errors with "[time] /path/to/file.cc:line: "; clients get the message alone.
_XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class GrammarError(ValueError):
    """The requested schema cannot be compiled into a grammar."""


class RequestGrammar:
    """One request's grammar state. Inactive until `enforce_after_token_id` is sampled (if set)."""

    def __init__(self, matcher: xgr.GrammarMatcher, enforce_after_token_id: int | None) -> None:
        self.matcher = matcher
        self.enforce_after_token_id = enforce_after_token_id
        self.is_active = enforce_after_token_id is None

    @property
    def is_terminated(self) -> bool:
        return self.is_active and self.matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        if not self.is_active:
            self.is_active = token_id == self.enforce_after_token_id
            return
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not fit the request's grammar")


def _encoded_vocab(tokenizer: K2Tokenizer, vocab_size: int) -> list[bytes]:
    # Byte-level BPE: each token is raw bytes. Special tokens (and the model's padding rows past the
    # tokenizer) get no text, so no grammar can ever match them; the stop ids end the grammar instead.
    return [b"" if token_id >= tokenizer.vocab_size or tokenizer.is_special(token_id)
            else tokenizer.token_bytes(token_id) for token_id in range(vocab_size)]


class StructuredOutputManager:
    """Vocabulary, compiler, compiled-grammar cache and matcher factory; `check` and `submit` may be
    called from any thread. Grammars end on the engine's stop ids plus the tokenizer's (<|im_end|> and
    [EOS]). Building the vocabulary costs one pass over it (about 0.2 s for a 163,840-token one)."""

    def __init__(self, tokenizer: K2Tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 executor: Executor) -> None:
        self.vocab_size = vocab_size
        stop_ids = sorted(frozenset(stop_token_ids) | set(tokenizer.stop_token_ids))
        info = xgr.TokenizerInfo(_encoded_vocab(tokenizer, vocab_size), xgr.VocabType.RAW,
                                 vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._executor = executor
        self._grammars: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        # Schemas being compiled: a second request with the same one waits on the same compilation.
        self._in_flight: dict[str, Future[xgr.CompiledGrammar]] = {}
        self._lock = threading.Lock()

    def check(self, params: StructuredOutputParams) -> None:
        """Raise GrammarError if `params` can never be compiled; cheap (parses, does not compile)."""
        if params.enforce_after_token_id is not None and params.enforce_after_token_id >= self.vocab_size:
            raise GrammarError(f"enforce_after_token_id must be below {self.vocab_size}")
        key = params.schema_key
        with self._lock:
            if key in self._grammars:
                return
        _xgrammar_call(xgr.Grammar.from_json_schema, key, any_whitespace=False, strict_mode=True)

    def submit(self, params: StructuredOutputParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of `params`' schema, compiled on the pool unless cached. The future
        raises GrammarError if the schema cannot be compiled."""
        key = params.schema_key
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is None:
                future = self._in_flight.get(key)
                if future is None:
                    future = self._in_flight[key] = self._executor.submit(self._compile, key)
                return future
            self._grammars.move_to_end(key)
        done: Future[xgr.CompiledGrammar] = Future()
        done.set_result(grammar)
        return done

    def _compile(self, key: str) -> xgr.CompiledGrammar:
        try:
            # Compact separators, like json.dumps: free whitespace would let a model pad without end.
            grammar = _xgrammar_call(self._compiler.compile_json_schema, key, any_whitespace=False,
                                     strict_mode=True)
            with self._lock:
                self._grammars[key] = grammar
                if len(self._grammars) > MAX_CACHED_GRAMMARS:
                    self._grammars.popitem(last=False)
            return grammar
        finally:
            with self._lock:
                self._in_flight.pop(key, None)

    def new_grammar(self, compiled: xgr.CompiledGrammar, params: StructuredOutputParams,
                    output_token_ids: Sequence[int]) -> RequestGrammar:
        """A fresh matcher, advanced over the output tokens the request already has."""
        grammar = RequestGrammar(xgr.GrammarMatcher(compiled), params.enforce_after_token_id)
        for token_id in output_token_ids:
            grammar.accept(token_id)
        return grammar


def _xgrammar_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # xgrammar raises plain RuntimeErrors on schemas it cannot handle
        lines = [_XGRAMMAR_LOCATION.sub("", line).strip() for line in str(exc).splitlines()]
        reason = next((line for line in lines if line), type(exc).__name__)
        raise GrammarError(f"invalid JSON schema: {reason}") from None


def apply_grammar_bitmask(logits: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> None:
    """Mask, in place, the logits ([B, V] float32) of every row whose grammar is active to the tokens
    its grammar allows next; other rows are untouched."""
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None and grammar.is_active]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])  # [B, ceil(V / 32)] int32
    for row in rows:
        grammars[row].matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
