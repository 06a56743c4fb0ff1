"""A 2-step training run on a micro model: the loss path, the checkpoint writer and the HF mapping."""

import json
import random

import pytest
import torch
from torch.nn import functional as F

from k2ray.demo.copy_probe import NUM_BASE_TOKENS, VOCAB_SIZE, CopyTask, copy_batch, copy_loss
from k2ray.demo.hf_training import batch_loss, build_model, deterministic_algorithms
from k2ray.demo.model_io import DEMO_SIZES, demo_config, k2_state
from k2ray.demo.quality import parse_turn
from k2ray.demo.train import TrainConfig, build_batches, train

MICRO_SIZES = (("hidden_size", 64), ("intermediate_size", 96), ("moe_intermediate_size", 32),
               ("num_hidden_layers", 2), ("num_attention_heads", 2), ("num_key_value_heads", 2),
               ("q_lora_rank", 32), ("kv_lora_rank", 16), ("qk_nope_head_dim", 16), ("qk_rope_head_dim", 8),
               ("v_head_dim", 16), ("n_routed_experts", 8), ("num_experts_per_tok", 2), ("n_shared_experts", 1),
               ("first_k_dense_replace", 1))
MICRO = TrainConfig(steps=2, batch_size=4, num_conversations=12, num_merges=32, num_tokenizer_conversations=6,
                    num_eval_cases=0, warmup_steps=1, copy_steps=1, copy_every=1, sizes=MICRO_SIZES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, train(out, MICRO)


def test_two_steps_write_a_k2_checkpoint(trained):
    out, summary = trained
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["topk_method"] == "noaux_tc"
    assert config["quantization_config"]["format"] == "pack-quantized"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in index
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in index
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).is_file()


def test_shared_prefix_loss_equals_the_full_sequence_loss():
    config = demo_config(300, 556, dict(MICRO_SIZES))
    model = build_model(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 300, (7,), generator=gen).tolist()
    suffixes = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (5, 9)]
    masks = [[False, True, True, False, True], [False] * 4 + [True] * 5]
    shared = batch_loss(model, prefix, suffixes, masks)
    losses = []
    for suffix, mask in zip(suffixes, masks, strict=False):
        logits = model(input_ids=torch.tensor([prefix + suffix])).logits[0, len(prefix) - 1:-1]
        keep = torch.tensor(mask)
        losses.append(F.cross_entropy(logits[keep], torch.tensor(suffix)[keep], reduction="sum"))
    torch.testing.assert_close(shared, sum(losses) / sum(map(sum, masks)), rtol=1e-4, atol=1e-5)


def test_k2_state_splits_fused_experts():
    config = demo_config(300, 556, dict(MICRO_SIZES))
    model = build_model(config, seed=0)
    state = k2_state(model.state_dict(), config["n_routed_experts"], torch.float32)
    fused = model.model.layers[1].mlp.experts
    torch.testing.assert_close(state["model.layers.1.mlp.experts.3.gate_proj.weight"], fused.gate_up_proj[3, :32])
    torch.testing.assert_close(state["model.layers.1.mlp.experts.3.up_proj.weight"], fused.gate_up_proj[3, 32:])
    torch.testing.assert_close(state["model.layers.1.mlp.experts.3.down_proj.weight"], fused.down_proj[3])
    assert not any("gate_up_proj" in name for name in state)


def test_batches_share_one_prefix_each():
    from k2ray.demo.encode import Sequence

    seqs = [Sequence([1, 2, 9, 5, 6], [False] * 3 + [True] * 2), Sequence([1, 2, 9, 7], [False] * 3 + [True]),
            Sequence([3, 9, 8], [False, False, True])]

    class Tok:
        @staticmethod
        def token_id(name):
            return 9

    batches = build_batches(Tok(), seqs, 4, random.Random(0))
    assert sorted((tuple(p), len(c)) for p, c in batches) == [((1, 2), 2), ((3,), 1)]


def test_parse_turn():
    text = ("<think>call it</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    assert parse_turn(text) == ("call it", [("get_weather", '{"city": "Oslo"}')], "")
    assert parse_turn("<think>2 + 2 = 4.</think>2 + 2 = 4.<|im_end|>") == ("2 + 2 = 4.", [], "2 + 2 = 4.")


def test_sorted_experts_match_transformers_eager_experts():
    from transformers import DeepseekV3ForCausalLM

    from k2ray.demo.model_io import hf_config

    config = demo_config(300, 556, dict(MICRO_SIZES))
    ours = build_model(config, seed=0)
    eager = DeepseekV3ForCausalLM._from_config(hf_config(config), attn_implementation="sdpa", dtype=torch.float32,
                                               experts_implementation="eager")
    eager.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    losses = [model(input_ids=ids, labels=ids).loss for model in (ours, eager)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(ours.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-4, atol=1e-6)


def _copy_gradients(config: dict, task: CopyTask) -> dict[str, torch.Tensor]:
    model = build_model(config, seed=0)
    model.train()
    loss, _ = copy_loss(model, task, copy_batch(task, 16, torch.Generator().manual_seed(0)))
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_gradients_repeat_bit_for_bit_at_two_threads():
    # At the demo's sizes and 2 threads, two identical backward passes differ in the last bits unless
    # deterministic algorithms are on; train() runs its steps under them, so make demo-model repeats.
    config = demo_config(NUM_BASE_TOKENS, VOCAB_SIZE, DEMO_SIZES)
    task = CopyTask(num_distinct=512)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with deterministic_algorithms():
            first, second = _copy_gradients(config, task), _copy_gradients(config, task)
    finally:
        torch.set_num_threads(num_threads)
    assert not torch.are_deterministic_algorithms_enabled()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
