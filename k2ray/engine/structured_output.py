"""Grammar-constrained decoding (vLLM's structured output) over xgrammar.

The engine owns one StructuredOutputManager: the vocabulary as xgrammar sees it (built once), compiled
grammars cached per schema, and a RequestGrammar (one GrammarMatcher) per constrained request, held by
the model runner. Per step the runner fills a token bitmask for the constrained rows only and masks
their logits to -inf before sampling, then feeds each sampled token to its matcher. A preempted request
keeps its runner state (recompute rebuilds KV, not outputs), so its matcher stays in step; a request the
runner first sees with output tokens (a decode engine taking a prefilled request) replays them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import xgrammar as xgr

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.sampling_params import StructuredOutputParams

# Distinct schemas kept compiled; a service sees few, and recompiling an evicted one is cheap.
MAX_CACHED_GRAMMARS = 64


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
    """Vocabulary, compiled-grammar cache and matcher factory. `compile` may run on any thread.

    The vocabulary is read on the first constrained request, through `load_tokenizer`: an engine
    serving token ids only (skip_tokenizer_init) still reads the checkpoint's tokenizer files then.
    Grammars end on the engine's stop ids plus the tokenizer's (<|im_end|> and [EOS]).
    """

    def __init__(self, load_tokenizer: Callable[[], K2Tokenizer], vocab_size: int,
                 stop_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self._load_tokenizer = load_tokenizer
        self._stop_token_ids = frozenset(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._grammars: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                try:
                    tokenizer = self._load_tokenizer()
                except OSError as exc:
                    raise GrammarError(f"structured output needs the checkpoint's tokenizer: {exc}") from None
                stop_token_ids = sorted(self._stop_token_ids | set(tokenizer.stop_token_ids))
                info = xgr.TokenizerInfo(_encoded_vocab(tokenizer, self.vocab_size), xgr.VocabType.RAW,
                                         vocab_size=self.vocab_size, stop_token_ids=stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            return self._compiler

    def compile(self, params: StructuredOutputParams) -> xgr.CompiledGrammar:
        """The compiled grammar of `params`' schema (cached, LRU); raises GrammarError if invalid."""
        if params.enforce_after_token_id is not None and params.enforce_after_token_id >= self.vocab_size:
            raise GrammarError(f"enforce_after_token_id must be below {self.vocab_size}")
        compiler = self._get_compiler()
        key = params.schema_key
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
        try:
            # Compact separators, like json.dumps: free whitespace would let a model pad without end.
            grammar = compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # xgrammar raises plain RuntimeErrors on schemas it cannot handle
            raise GrammarError(f"invalid JSON schema for response_format: {exc}") from None
        with self._lock:
            self._grammars[key] = grammar
            if len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def new_grammar(self, params: StructuredOutputParams, output_token_ids: Sequence[int]) -> RequestGrammar:
        """A fresh matcher, advanced over the output tokens the request already has."""
        grammar = RequestGrammar(xgr.GrammarMatcher(self.compile(params)), params.enforce_after_token_id)
        for token_id in output_token_ids:
            grammar.accept(token_id)
        return grammar


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
