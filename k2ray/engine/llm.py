from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from k2ray.api.chat_template import ChatTemplate
from k2ray.engine.config import EngineConfig
from k2ray.engine.ep.ep_llm_engine import EPLLMEngine
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.outputs import RequestOutput
from k2ray.model.default_checkpoint import default_checkpoint_dir
from k2ray.sampling_params import SamplingParams

PromptType = str | Mapping[str, Any]
Conversation = Sequence[Mapping[str, Any]]


class LLM:
    """Offline generation in vLLM's API: `LLM(model).generate(prompts, sampling_params)`.

    Prompts are strings or {"prompt_token_ids": [...]}. n > 1 fans out into n engine requests
    (seed + i when seeded) merged back into one RequestOutput; outputs come back in input order.
    """

    def __init__(self, model: str | Path | None = None, dtype: str = "auto", skip_tokenizer_init: bool = False,
                 seed: int = 0, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=str(model or default_checkpoint_dir()), dtype=dtype,
                                   skip_tokenizer_init=skip_tokenizer_init, seed=seed, **engine_kwargs)
        # ep_size > 1: the engine is a group of rank processes, the routed experts sharded over them.
        self.llm_engine = EPLLMEngine(self.config) if self.config.ep_size > 1 else LLMEngine(self.config)
        self._chat_template: ChatTemplate | None = None
        self._num_requests = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str | Mapping):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        groups = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                groups.append(self._add(prompt, params))
        except Exception:  # e.g. a rejected prompt: drop the ones already queued with it
            self.llm_engine.abort_requests([sub_id for group in groups for sub_id in group[1]])
            raise
        finished = self._run_engine([sub_id for group in groups for sub_id in group[1]])
        return [self._merge(ids, finished) for ids in groups]

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs the tokenizer (skip_tokenizer_init=True was set)")
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_checkpoint(self.config.model)
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = []
        for conversation in conversations:
            segments = self._chat_template.render_segments(
                conversation, tools=tools, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
            prompts.append({"prompt": "".join(s.text for s in segments),
                            "prompt_token_ids": tokenizer.encode_segments(segments)})
        return self.generate(prompts, sampling_params)

    def _add(self, prompt: PromptType, params: SamplingParams) -> tuple[str, list[str], str | None, list[int]]:
        if isinstance(prompt, str):
            if self.llm_engine.tokenizer is None:
                raise ValueError("string prompts need the tokenizer (skip_tokenizer_init=True was set)")
            text, token_ids = prompt, self.llm_engine.tokenizer.encode(prompt)
        else:
            text, token_ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        request_id = str(self._num_requests)
        self._num_requests += 1
        sub_ids = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            sub_params = dataclasses.replace(params, n=1, seed=seed)
            sub_id = request_id if params.n == 1 else f"{request_id}_{index}"
            self.llm_engine.add_request(sub_id, token_ids, sub_params, prompt=text)
            sub_ids.append(sub_id)
        return request_id, sub_ids, text, token_ids

    def _run_engine(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        engine = self.llm_engine
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        except BaseException:
            engine.abort_requests([request_id for request_id in request_ids if request_id not in finished])
            raise
        return finished

    @staticmethod
    def _merge(group: tuple[str, list[str], str | None, list[int]],
               finished: dict[str, RequestOutput]) -> RequestOutput:
        request_id, sub_ids, text, token_ids = group
        parts = [finished[sub_id] for sub_id in sub_ids]
        completions = []
        for index, part in enumerate(parts):
            completion = part.outputs[0]
            completion.index = index
            completions.append(completion)
        return RequestOutput(request_id, text, token_ids, completions, True,
                             max(part.num_cached_tokens for part in parts))
