"""The embedded k2-demo checkpoint: k2ray's engine generates the same greedy tokens as transformers'
DeepseekV3ForCausalLM on its dequantized weights (routed experts unpacked by compressed-tensors itself) on
eval prompts, and its chat_template.jinja, rendered by transformers' jinja2 setup, is byte-identical to
k2ray's built-in renderer on the conversations the demo trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2ray.api.chat_template import TEMPLATE_FILE, ChatTemplate, render_builtin
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.default_checkpoint import DEMO_CHECKPOINT_NAME, embedded_checkpoint_dir

from .hf_checkpoints import load_hf_reference

DEMO_DIR = embedded_checkpoint_dir(DEMO_CHECKPOINT_NAME)
pytestmark = pytest.mark.skipif(not (DEMO_DIR / "config.json").exists(),
                                reason="k2ray/assets/k2-demo is not built yet (make demo-model)")

# One prompt per task; transformers' eager MoE takes most of the test's time.
EVAL_TASKS = ("arithmetic", "weather", "units", "decline")
MAX_NEW_TOKENS = 40
NUM_TEMPLATE_CONVERSATIONS = 400
TEMPLATE_SEED = 7


def dequantized_copy(quantized: Path, dst: Path) -> Path:
    """The INT4 checkpoint with every pack-quantized weight expanded to fp32 by compressed-tensors' own
    unpacker (not k2ray's kernels), everything else upcast, in one shard transformers loads."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    config = json.loads((quantized / "config.json").read_text())
    group = config.pop("quantization_config")["config_groups"]["group_0"]["weights"]
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(quantized.glob("*.safetensors")):
        tensors.update(load_file(shard))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("weight_scale", "weight_shape")):
            continue
        if name.endswith("weight_packed"):
            module = name.removesuffix(".weight_packed")
            shape = torch.Size(tensors[f"{module}.weight_shape"].tolist())
            q = unpack_from_int32(tensor, group["num_bits"], shape)
            scale = tensors[f"{module}.weight_scale"].float().repeat_interleave(group["group_size"], dim=1)
            out[f"{module}.weight"] = (q.float() * scale[:, : shape[1]]).contiguous()
        else:
            out[name] = tensor.float()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def eval_prompts(tokenizer: K2Tokenizer) -> list[list[int]]:
    """One held-out eval prompt per task, rendered and tokenized as the server does."""
    from k2ray.demo.conversations import heldout_cases
    from k2ray.demo.encode import declared_tools

    template = ChatTemplate.from_checkpoint(DEMO_DIR)
    cases = [heldout_cases(task, 1, seed=0)[0] for task in EVAL_TASKS]
    return [tokenizer.encode(template.render(c.messages, tools=declared_tools(c.tools)), allow_special_tokens=True)
            for c in cases]


@torch.no_grad()
def hf_argmax(model, prompt: list[int], generated: list[int]) -> list[int]:
    """transformers' greedy choice at each generated position, given the same prefix: one forward over the
    whole sequence, equal to `generated` exactly when its greedy decoding yields the same tokens."""
    logits = model(torch.tensor([prompt + generated])).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(generated)].argmax(-1).tolist()


def test_greedy_tokens_match_transformers_on_dequantized_weights(tmp_path: Path) -> None:
    from k2ray import LLM, SamplingParams

    tokenizer = K2Tokenizer.from_pretrained(DEMO_DIR)
    prompts = eval_prompts(tokenizer)
    llm = LLM(DEMO_DIR, dtype="float32", block_size=16, num_kv_blocks=256)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))
    finally:
        llm.llm_engine.shutdown()
    generated = [list(o.outputs[0].token_ids) for o in outputs]
    reference = load_hf_reference(dequantized_copy(DEMO_DIR, tmp_path / "dequantized"))
    assert [hf_argmax(reference, p, g) for p, g in zip(prompts, generated, strict=True)] == generated
    # The trained model answers and stops: it is not a random one that runs to the budget.
    stop_ids = tokenizer.stop_token_ids
    assert sum(g[-1] in stop_ids for g in generated) >= len(generated) // 2


def test_jinja_template_renders_the_training_conversations_like_the_builtin() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    from k2ray.demo.conversations import client_messages, training_conversations
    from k2ray.demo.encode import declared_tools

    source = (DEMO_DIR / TEMPLATE_FILE).read_text(encoding="utf-8")
    num_rendered = 0
    for conv in training_conversations(NUM_TEMPLATE_CONVERSATIONS, TEMPLATE_SEED):
        tools = declared_tools(conv.tools)
        # Every request of the conversation (up to each assistant turn) and the whole of it.
        ends = [k for k, m in enumerate(conv.messages) if m["role"] == "assistant"]
        for end, is_request in [*((k, True) for k in ends), (len(conv.messages), False)]:
            messages = client_messages(conv.messages[:end])
            (jinja,), _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=source,
                                                add_generation_prompt=is_request)
            assert jinja == render_builtin(messages, tools, add_generation_prompt=is_request), (conv.task, end)
            num_rendered += 1
    assert num_rendered > NUM_TEMPLATE_CONVERSATIONS
