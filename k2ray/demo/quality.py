"""Held-out accuracy of a written demo checkpoint through k2ray's own engine (greedy), per task.

A case passes when its first turn is right (the expected call with the expected arguments, or a direct
answer) and, after the true tool result, its answer contains the expected values; every turn must think.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from k2ray.api.chat_template import ChatTemplate
from k2ray.model.quantize import SAFETENSORS_METADATA

from .conversations import TASKS, HeldoutCase, client_messages, heldout_cases
from .encode import declared_tools
from .model_io import k2_state

MAX_TURN_TOKENS = 128
_CALL = re.compile(r"<\|tool_call_begin\|>(.*?)<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>", re.S)
_THINK = re.compile(r"^<think>(.+?)</think>", re.S)
DENSE_SHARD = "model.safetensors"
COPIED_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def parse_turn(text: str) -> tuple[str, list[tuple[str, str]], str]:
    """(reasoning, [(function name, arguments)], content) of one generated assistant turn."""
    think = _THINK.match(text)
    reasoning = think.group(1).strip() if think else ""
    rest = text[think.end():] if think else text
    calls = [(raw_id.strip().removeprefix("functions.").rpartition(":")[0], args.strip())
             for raw_id, args in _CALL.findall(rest)]
    content = re.split(r"<\|tool_calls_section_begin\|>|<\|im_end\|>", rest)[0]
    return reasoning, calls, content


def _first_turn_ok(case: HeldoutCase, text: str) -> bool:
    reasoning, calls, content = parse_turn(text)
    if not reasoning:
        return False
    if case.expected_tool is None:
        return not calls and all(v in content for v in case.expected_answer_values)
    if len(calls) != 1 or calls[0][0] != case.expected_tool:
        return False
    try:
        return json.loads(calls[0][1]) == case.expected_arguments
    except json.JSONDecodeError:
        return False


def _answer_ok(case: HeldoutCase, text: str) -> bool:
    reasoning, calls, content = parse_turn(text)
    return bool(reasoning) and not calls and all(v in content for v in case.expected_answer_values)


def _generate(llm, template: ChatTemplate, requests: list[tuple[list[dict], list | None]]) -> list[str]:
    from k2ray.sampling_params import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer.encode_segments(template.render_segments(m, tools=declared_tools(t)))}
               for m, t in requests]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TURN_TOKENS))
    return [tokenizer.decode(list(o.outputs[0].token_ids)) for o in outputs]


def engine_accuracy(checkpoint_dir: Path, num_cases: int, seed: int) -> dict[str, float]:
    from k2ray.engine.llm import LLM

    llm = LLM(checkpoint_dir, dtype="float32")
    template = ChatTemplate.from_checkpoint(checkpoint_dir)
    cases = [c for task in TASKS for c in heldout_cases(task, num_cases, seed)]
    first = _generate(llm, template, [(c.messages, c.tools) for c in cases])
    passed = [_first_turn_ok(c, t) for c, t in zip(cases, first, strict=True)]
    with_tool = [i for i, c in enumerate(cases) if c.expected_tool is not None]
    follow = [client_messages(cases[i].conversation.messages[:cases[i].conversation.prompt_len + 2])
              for i in with_tool]
    second = _generate(llm, template, [(m, cases[i].tools) for m, i in zip(follow, with_tool, strict=True)])
    for i, text in zip(with_tool, second, strict=True):
        passed[i] = passed[i] and _answer_ok(cases[i], text)
    return {task: sum(p for c, p in zip(cases, passed, strict=True) if c.task == task) / num_cases
            for task in TASKS}


def write_dense_checkpoint(out_dir: Path, source_dir: Path, k2_config: dict, hf_state: dict[str, torch.Tensor]) -> Path:
    """The same model unquantized (bf16, one shard), beside the INT4 one, for the precision comparison."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(k2_state(hf_state, k2_config["n_routed_experts"]), str(out_dir / DENSE_SHARD),
              metadata=SAFETENSORS_METADATA)
    config = {k: v for k, v in k2_config.items() if k != "quantization_config"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        shutil.copyfile(source_dir / name, out_dir / name)
    return out_dir


def compare_precisions(int4_dir: Path, dense_dir: Path, k2_config: dict, hf_state: dict[str, torch.Tensor],
                       num_cases: int, seed: int) -> dict[str, dict[str, Any]]:
    write_dense_checkpoint(dense_dir, int4_dir, k2_config, hf_state)
    full = engine_accuracy(dense_dir, num_cases, seed)
    int4 = engine_accuracy(int4_dir, num_cases, seed)
    return {task: {"full": full[task], "int4": int4[task]} for task in TASKS}
