"""transformers' DeepseekV3ForCausalLM set up for fast, reproducible CPU training with its own math unchanged.

Two speed-ups that leave the math unchanged (equal to float rounding): the routed experts run on their own tokens only, sorted by
expert into one contiguous slice each (no one-hot masks, no per-expert `where`), and a batch shares the KV of
its common prefix (tool declarations + system prompt), computed once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F

SORTED_EXPERTS = "k2ray_sorted"
ROUTER_BIAS_STEP = 1e-3  # K2/DeepSeek-V3's auxiliary-loss-free balancing: bias += step * sign(mean - load)


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    num_top_k = top_k_index.shape[1]
    expert_ids = top_k_index.flatten()
    order = expert_ids.argsort(stable=True)
    token_ids = order // num_top_k
    counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
    outs = []
    for expert, x in enumerate(hidden_states[token_ids].split(counts)):
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        outs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
    weighted = torch.cat(outs) * top_k_weights.flatten()[order, None].to(hidden_states.dtype)
    return torch.zeros_like(hidden_states).index_add(0, token_ids, weighted)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic algorithms, on for the block: with more than one thread some CPU backward kernels
    otherwise add up in a different order run to run (one copy batch's gradients already differ at 2 threads),
    and over thousands of steps so do the weights."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled)


def build_model(k2_config: dict, seed: int):
    from transformers import DeepseekV3ForCausalLM
    from transformers.integrations.moe import ExpertsInterface

    from .model_io import hf_config

    ExpertsInterface.register(SORTED_EXPERTS, sorted_experts_forward)
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM._from_config(hf_config(k2_config), attn_implementation="sdpa", dtype=torch.float32,
                                               experts_implementation=SORTED_EXPERTS)


class RouterBalancer:
    """Counts each MoE layer's expert loads per step and nudges e_score_correction_bias toward balance."""

    def __init__(self, model) -> None:
        self.gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        self.loads = [torch.zeros(g.num_experts) for g in self.gates]
        for gate, load in zip(self.gates, self.loads, strict=True):
            gate.register_forward_hook(self._hook(load))

    @staticmethod
    def _hook(load: torch.Tensor):
        def hook(module, args, output) -> None:
            load.add_(torch.bincount(output[2].flatten(), minlength=module.num_experts).float())
        return hook

    @torch.no_grad()
    def step(self) -> None:
        for gate, load in zip(self.gates, self.loads, strict=True):
            gate.e_score_correction_bias += ROUTER_BIAS_STEP * torch.sign(load.mean() - load)
            load.zero_()


def batch_loss(model, prefix_ids: list[int], suffixes: list[list[int]], masks: list[list[bool]]) -> torch.Tensor:
    """Mean next-token loss over the masked suffix tokens of sequences sharing `prefix_ids`."""
    batch = len(suffixes)
    width = max(len(s) for s in suffixes)
    pad = suffixes[0][0]
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes])
    # Position j predicts token j + 1; right padding never reaches a real token under the causal mask.
    target_mask = torch.tensor([m[1:] + [False] * (width - len(m)) + [False] for m in masks])
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    prefix = model.model(input_ids=torch.tensor([prefix_ids]), use_cache=True)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(batch)
    positions = torch.arange(len(prefix_ids), len(prefix_ids) + width).expand(batch, -1)
    hidden = model.model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).last_hidden_state
    logits = model.lm_head(hidden[target_mask])
    return F.cross_entropy(logits.float(), targets[target_mask])
