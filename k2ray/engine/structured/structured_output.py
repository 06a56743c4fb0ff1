"""Grammar-constrained decoding (vLLM's structured output) over xgrammar.

A request's StructuredOutputParams (JSON content, K2 tool calls, or both, after an optional reasoning
part) become an xgrammar structural tag (tool_call_grammar.py). A spent reasoning budget forces
`</think>` at run time (ReasoningBudget), outside the grammar, so one compiled grammar serves every
max_tokens.

The engine owns one StructuredOutputManager, built when the engine starts: the vocabulary as xgrammar
sees it and its GrammarCompiler, compiled grammars cached per spec, and a small thread pool that
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

from k2ray.api.output_parser import THINK_END
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.engine.structured.json_schema_grammar import GrammarError
from k2ray.engine.structured.tool_call_grammar import MARKER_TOKENS, build_structural_tag
from k2ray.sampling_params import StructuredOutputParams

# xgrammar's token bitmask packs 32 tokens per int32 word, token i at bit i % 32 of word i // 32.
BITS_PER_MASK_WORD = 32
# Distinct schemas kept compiled; a service sees few, and recompiling an evicted one is cheap.
MAX_CACHED_GRAMMARS = 64
# xgrammar prefixes its errors with "[time] /path/to/file.cc:line: "; clients get the message alone.
_XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class ReasoningBudget:
    """Counts a request's reasoning tokens and asks for `</think>` once `max_tokens` are spent. The
    reasoning ends at the first `</think>` in the output text (its grammar excludes it before), whether
    the model wrote the special token or ordinary pieces, so the count follows the bytes."""

    def __init__(self, max_tokens: int, think_end_token_id: int, vocab: Sequence[bytes]) -> None:
        self.max_tokens = max_tokens
        self.think_end_token_id = think_end_token_id
        self._vocab = vocab
        self._think_end = vocab[think_end_token_id]
        self._tail = b""
        self.num_tokens = 0
        self.is_reasoning = True

    @property
    def forced_token_id(self) -> int | None:
        return self.think_end_token_id if self.is_reasoning and self.num_tokens >= self.max_tokens else None

    def accept(self, token_id: int) -> None:
        if not self.is_reasoning:
            return
        self.num_tokens += 1
        self._tail = (self._tail + self._vocab[token_id])[-len(self._think_end):]
        self.is_reasoning = self._tail != self._think_end


class RequestGrammar:
    """One request's grammar state. Inactive until `enforce_after_token_id` is sampled (if set)."""

    def __init__(self, matcher: xgr.GrammarMatcher, enforce_after_token_id: int | None,
                 reasoning_budget: ReasoningBudget | None = None) -> None:
        self.matcher = matcher
        self.enforce_after_token_id = enforce_after_token_id
        self.is_active = enforce_after_token_id is None
        self.reasoning_budget = reasoning_budget

    @property
    def is_terminated(self) -> bool:
        return self.is_active and self.matcher.is_terminated()

    @property
    def forced_token_id(self) -> int | None:
        """The token the next step must take, if the grammar allows it (a spent reasoning budget)."""
        return self.reasoning_budget.forced_token_id if self.reasoning_budget is not None else None

    def accept(self, token_id: int) -> None:
        if not self.is_active:
            self.is_active = token_id == self.enforce_after_token_id
            return
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not fit the request's grammar")
        if self.reasoning_budget is not None:
            self.reasoning_budget.accept(token_id)


def _encoded_vocab(tokenizer: K2Tokenizer, vocab_size: int) -> list[bytes]:
    # Byte-level BPE: each token is raw bytes. K2's marker tokens get their text, so a grammar can
    # place them (tool_call_grammar.py); every other special token (and the model's padding rows past
    # the tokenizer) gets none, so no grammar can ever match it; the stop ids end the grammar instead.
    marker_ids = {tokenizer.token_id(marker) for marker in MARKER_TOKENS}
    return [b"" if token_id >= tokenizer.vocab_size or (tokenizer.is_special(token_id) and token_id not in marker_ids)
            else tokenizer.token_bytes(token_id) for token_id in range(vocab_size)]


class StructuredOutputManager:
    """Vocabulary, compiler, compiled-grammar cache and matcher factory; `check` and `submit` may be
    called from any thread. Grammars end on the engine's stop ids plus the tokenizer's (<|im_end|> and
    [EOS]). Building the vocabulary costs one pass over it (about 0.2 s for a 163,840-token one)."""

    def __init__(self, tokenizer: K2Tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 executor: Executor) -> None:
        self.vocab_size = vocab_size
        self.think_end_token_id = tokenizer.token_id(THINK_END)
        stop_ids = sorted(frozenset(stop_token_ids) | set(tokenizer.stop_token_ids))
        self._vocab = _encoded_vocab(tokenizer, vocab_size)
        info = xgr.TokenizerInfo(self._vocab, xgr.VocabType.RAW,
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
        _xgrammar_call(xgr.Grammar.from_structural_tag, build_structural_tag(params))

    def submit(self, params: StructuredOutputParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of `params`' schema, compiled on the pool unless cached. The future
        raises GrammarError if the schema cannot be compiled."""
        key = params.schema_key
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is None:
                future = self._in_flight.get(key)
                if future is None:
                    future = self._in_flight[key] = self._executor.submit(self._compile, key, params)
                return future
            self._grammars.move_to_end(key)
        done: Future[xgr.CompiledGrammar] = Future()
        done.set_result(grammar)
        return done

    def _compile(self, key: str, params: StructuredOutputParams) -> xgr.CompiledGrammar:
        try:
            grammar = _xgrammar_call(self._compiler.compile_structural_tag, build_structural_tag(params))
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
        budget = None
        if params.max_reasoning_tokens is not None:
            budget = ReasoningBudget(params.max_reasoning_tokens, self.think_end_token_id, self._vocab)
        grammar = RequestGrammar(xgr.GrammarMatcher(compiled), params.enforce_after_token_id, budget)
        for token_id in output_token_ids:
            grammar.accept(token_id)
        return grammar


def _xgrammar_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except GrammarError:
        raise
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
        grammar = grammars[row]
        grammar.matcher.fill_next_token_bitmask(bitmask, row)
        forced = grammar.forced_token_id
        if forced is not None:
            _force_token(bitmask, row, forced)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def _force_token(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    """Leave `token_id` alone allowed in `row`, if the grammar allows it there (a marker half spelled
    in pieces may have to finish first)."""
    word, bit = divmod(token_id, BITS_PER_MASK_WORD)
    if not (int(bitmask[row, word]) >> bit) & 1:
        return
    bitmask[row].zero_()
    # int32 words: bit 31 is the sign bit, so the word is built in int64 and wrapped.
    bitmask[row, word] = torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)
