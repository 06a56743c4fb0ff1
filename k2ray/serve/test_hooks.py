"""Test-only hooks, fenced: nothing here is imported unless the deployment sets `testing.allow_injection`.

A request's `k2ray_test` field (see `TestInjection`) becomes an `Injection` at the router; the engine
core honours it through the serving path users run: a scripted request is replayed by the core as
engine outputs, one token per loop turn (or per `token_delay_s`), through the same delta assembler and
transport (the delta channel by default) as a real request; `fail_after_tokens` fails a real (or
scripted) request after that many tokens the way a failed engine step does, aborting the engine
request and freeing its blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from k2ray.engine.outputs import CompletionOutput, RequestOutput
from k2ray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from k2ray.api.tokenizer import K2Tokenizer

INJECTED_FAILURE_MESSAGE = "injected engine failure"


class TestInjection(BaseModel):
    """The `k2ray_test` request extension.

    `script` replays that exact text (special tokens included) as the model's output; `fail_after_tokens`
    fails the request after that many tokens; `token_delay_s` paces a scripted stream. `rounds` scripts
    the generation rounds of a server-side tool loop: round i replays `rounds[i]` (the last one for later
    rounds), so a test can make the model call `$web_search` and then answer.
    """

    model_config = ConfigDict(extra="forbid")
    script: str | None = None
    rounds: list[str] | None = Field(default=None, min_length=1)
    token_delay_s: float = Field(default=0.0, ge=0.0, le=1.0)
    fail_after_tokens: int | None = Field(default=None, ge=0)
    fail_round: int | None = Field(default=None, ge=0)  # the one round fail_after_tokens fails (None: each)
    prefill_stall_s: float = Field(default=0.0, ge=0.0, le=60.0)  # disaggregated: the prefill replica stalls

    @model_validator(mode="after")
    def _one_script_kind(self) -> TestInjection:
        if self.script is not None and self.rounds is not None:
            raise ValueError("set script or rounds, not both")
        return self


@dataclass(frozen=True)
class Injection:
    """What the engine core needs of a `TestInjection` (the script already tokenized)."""

    script_token_ids: tuple[int, ...] | None = None
    token_delay_s: float = 0.0
    fail_after_tokens: int | None = None
    # A tool loop's later rounds: their scripts, the one round that fails (None: each) and after how many tokens.
    round_script_token_ids: tuple[tuple[int, ...], ...] = ()
    fail_round: int | None = None
    round_fail_after_tokens: int | None = None
    prefill_stall_s: float = 0.0

    def for_round(self, round_index: int) -> Injection:
        """The injection of a tool loop's generation round `round_index` (0: the first, this one)."""
        if round_index == 0:
            return self
        later = self.round_script_token_ids
        script = later[min(round_index, len(later)) - 1] if later else self.script_token_ids
        is_failing = self.fail_round is None or self.fail_round == round_index
        return Injection(script, self.token_delay_s, self.round_fail_after_tokens if is_failing else None)


class InjectedFailure(RuntimeError):
    pass


def parse_injection(raw: dict[str, Any], tokenizer: K2Tokenizer) -> Injection:
    """Raises pydantic's ValidationError for a malformed `k2ray_test`."""
    test = TestInjection.model_validate(raw)
    script = None if test.script is None else tuple(tokenizer.encode(test.script))
    rounds = [tuple(tokenizer.encode(text)) for text in test.rounds or []]
    if rounds:
        script = rounds.pop(0)
    fails_first = test.fail_round is None or test.fail_round == 0
    return Injection(script, test.token_delay_s, test.fail_after_tokens if fails_first else None, tuple(rounds),
                     test.fail_round, test.fail_after_tokens, prefill_stall_s=test.prefill_stall_s)


def validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in ("k2ray_test", *first.get("loc", ())))
    return f"Invalid request: {loc}: {first.get('msg', 'invalid value')}"


@dataclass
class _Script:
    token_ids: tuple[int, ...]
    params: SamplingParams
    injection: Injection
    due_s: float
    num_sent: int = 0


@dataclass
class CoreInjector:
    """The engine core's side: scripted requests it replays, and requests it fails after N tokens."""

    scripts: dict[str, _Script] = field(default_factory=dict)
    fail_after: dict[str, int] = field(default_factory=dict)  # request -> tokens left before the failure

    def start(self, request_id: str, params: SamplingParams, injection: Injection) -> bool:
        """Track the request; True if it is scripted (the core must not give it to the engine)."""
        if injection.script_token_ids is not None:
            self.scripts[request_id] = _Script(injection.script_token_ids, params, injection,
                                               time.monotonic() + injection.token_delay_s)
            return True
        if injection.fail_after_tokens is not None:
            self.fail_after[request_id] = injection.fail_after_tokens
        return False

    def forget(self, request_id: str) -> bool:
        """Stop tracking; True if the request was scripted."""
        self.fail_after.pop(request_id, None)
        return self.scripts.pop(request_id, None) is not None

    @property
    def num_requests(self) -> int:
        return len(self.scripts) + len(self.fail_after)

    @staticmethod
    def failure() -> InjectedFailure:
        return InjectedFailure(INJECTED_FAILURE_MESSAGE)

    def wait_s(self, idle_s: float) -> float:
        """How long the core may wait for messages before a scripted token is due."""
        if not self.scripts:
            return idle_s
        next_due_s = min(script.due_s for script in self.scripts.values())
        return min(idle_s, max(0.0, next_due_s - time.monotonic()))

    def fails(self, output: RequestOutput) -> bool:
        """Whether this engine output is where an injected failure happens."""
        if output.request_id not in self.fail_after or output.finished:
            self.fail_after.pop(output.request_id, None)
            return False
        self.fail_after[output.request_id] -= len(output.outputs[0].token_ids)
        if self.fail_after[output.request_id] > 0:
            return False
        del self.fail_after[output.request_id]
        return True

    def due(self) -> tuple[list[RequestOutput], list[str]]:
        """Scripted outputs due now (one token each), and the scripted requests to fail now."""
        now = time.monotonic()
        outputs, failed = [], []
        for request_id, script in list(self.scripts.items()):
            if script.due_s > now:
                continue
            fail_after = script.injection.fail_after_tokens
            if fail_after is not None and script.num_sent >= fail_after:
                del self.scripts[request_id]
                failed.append(request_id)
                continue
            outputs.append(self._next_output(request_id, script))
            script.due_s = now + script.injection.token_delay_s
            if outputs[-1].finished:
                del self.scripts[request_id]
        return outputs, failed

    @staticmethod
    def _next_output(request_id: str, script: _Script) -> RequestOutput:
        if script.num_sent == len(script.token_ids):  # the script ran out: the model "stopped"
            return _output(request_id, [], "stop")
        token_id = script.token_ids[script.num_sent]
        script.num_sent += 1
        budget = script.params.max_tokens or len(script.token_ids)
        finish = None
        if token_id in script.params.stop_token_ids:
            finish = "stop"
        elif script.num_sent >= budget:
            finish = "length"
        return _output(request_id, [token_id], finish)


def _output(request_id: str, token_ids: list[int], finish_reason: str | None) -> RequestOutput:
    completion = CompletionOutput(0, "", token_ids, None, None, finish_reason)
    return RequestOutput(request_id, None, [], [completion], finish_reason is not None)


class SlowBlockStore:
    """A prefill core's block store whose reads each take `delay_s` longer: a slow network between
    the chunks of a KV transfer, so a test can kill the core or cut the client in mid-transfer."""

    def __init__(self, runner: Any, delay_s: float) -> None:
        self.runner = runner
        self.delay_s = delay_s
        self.device = runner.device

    @property
    def kv_layout(self) -> Any:
        return self.runner.kv_layout

    def read_kv_blocks(self, block_ids: Any, out: Any = None) -> Any:
        time.sleep(self.delay_s)
        return self.runner.read_kv_blocks(block_ids, out)

    def write_kv_blocks(self, block_ids: Any, kv: Any) -> None:
        self.runner.write_kv_blocks(block_ids, kv)
