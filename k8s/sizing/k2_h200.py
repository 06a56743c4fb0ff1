"""Sizing K2 Thinking on H200 nodes: GPUs per pool, weights and KV capacity per GPU, from K2's config.

    python k8s/sizing/k2_h200.py                  # print the table
    python k8s/sizing/k2_h200.py --write README.md  # replace the table between the sizing markers
    python k8s/sizing/k2_h200.py --check README.md  # exit 1 if the README's table differs

Each engine of a pool is one expert-parallel group of `ep_size` GPUs: every rank holds the BF16 weights that
are not routed experts (attention, shared experts, the dense layer, router gates, embeddings, lm_head) and
1/ep_size of the INT4 routed experts, and keeps its own KV cache for its own requests (k2ray/engine/config.py's
`ep_size`), so a group's KV capacity is the sum of its ranks'. The KV budget of a rank is what
`gpu_memory_utilization` of the GPU leaves after the weights and a reserve for the step's activations, CUDA
context and communication buffers; the engine measures the real figure at startup (kv_sizing.py's profiling
step) and logs it, so this table is for planning nodes, not a promise.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from k2ray.engine.config import DEFAULT_GPU_MEMORY_UTILIZATION
from k2ray.engine.runner.model_runner import kv_cache_bytes_per_token
from k2ray.model.args import ModelArgs

CONFIG_PATH = Path(__file__).resolve().parent / "kimi_k2_thinking_config.json"
H200_HBM_BYTES = 143_771 * 2**20  # what nvidia-smi reports for one H200 SXM (141 GB)
GPUS_PER_NODE = 8
ACTIVATION_RESERVE_BYTES = 8 * 2**30  # planning figure for the profiled step, CUDA context and EP buffers
BF16_BYTES = 2
SCALE_BYTES = 2  # one BF16 scale per quantization group
KV_DTYPE = torch.bfloat16
EP_SIZES = (8, 16, 32)
CONTEXT_LENGTHS = (32_768, 262_144)
BEGIN, END = "<!-- sizing:begin (k8s/sizing/k2_h200.py --write README.md) -->", "<!-- sizing:end -->"
GB, GIB = 10**9, 2**30


@dataclass(frozen=True)
class ParamCounts:
    routed_experts: int  # INT4, sharded over the EP group
    replicated: int  # BF16, on every rank

    @property
    def total(self) -> int:
        return self.routed_experts + self.replicated


def param_counts(args: ModelArgs) -> ParamCounts:
    h, heads = args.hidden_size, args.num_attention_heads
    attention = (h * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * heads * args.qk_head_dim
                 + h * args.kv_cache_dim + args.kv_lora_rank
                 + args.kv_lora_rank * heads * (args.qk_nope_head_dim + args.v_head_dim)
                 + heads * args.v_head_dim * h + 2 * h)  # + the two layer norms
    num_moe = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    num_dense = args.num_hidden_layers - num_moe
    expert = 3 * h * args.moe_intermediate_size  # gate, up and down projections
    replicated = (args.num_hidden_layers * attention + num_dense * 3 * h * args.intermediate_size
                  + num_moe * (args.n_shared_experts * expert + args.n_routed_experts * (h + 1))  # gate + bias
                  + 2 * args.vocab_size * h + h)  # embeddings, lm_head, final norm
    return ParamCounts(routed_experts=num_moe * args.n_routed_experts * expert, replicated=replicated)


def routed_bytes_per_param(args: ModelArgs) -> float:
    quant = args.quantization
    if quant is None:
        return BF16_BYTES
    return quant.num_bits / 8 + SCALE_BYTES / quant.group_size


@dataclass(frozen=True)
class RankSizing:
    ep_size: int
    weight_bytes: int
    kv_budget_bytes: int
    kv_tokens: int

    @property
    def num_nodes(self) -> int:
        return -(-self.ep_size // GPUS_PER_NODE)

    @property
    def group_kv_tokens(self) -> int:
        return self.kv_tokens * self.ep_size


def size_rank(args: ModelArgs, ep_size: int, hbm_bytes: int = H200_HBM_BYTES,
              gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> RankSizing:
    counts = param_counts(args)
    weights = int(counts.replicated * BF16_BYTES + counts.routed_experts * routed_bytes_per_param(args) / ep_size)
    budget = int(hbm_bytes * gpu_memory_utilization) - weights - ACTIVATION_RESERVE_BYTES
    if budget <= 0:
        raise ValueError(f"ep_size={ep_size}: {weights / GIB:.1f} GiB of weights per GPU leave no KV cache")
    return RankSizing(ep_size, weights, budget, budget // kv_cache_bytes_per_token(args, KV_DTYPE))


def load_args(path: Path = CONFIG_PATH) -> ModelArgs:
    return ModelArgs.from_hf_config(json.loads(path.read_text()))


def table(args: ModelArgs) -> str:
    counts = param_counts(args)
    per_token = kv_cache_bytes_per_token(args, KV_DTYPE)
    lines = [
        f"K2 Thinking: {counts.total / 1e12:.3f}T parameters ({counts.routed_experts / 1e12:.4f}T INT4 routed "
        f"experts, {counts.replicated / 1e9:.2f}B BF16 others); latent KV {per_token:,} B per token (BF16). "
        f"H200: {H200_HBM_BYTES / GIB:.1f} GiB, gpu_memory_utilization {DEFAULT_GPU_MEMORY_UTILIZATION}, "
        f"{ACTIVATION_RESERVE_BYTES // GIB} GiB reserved for activations and buffers.",
        "",
        "| EP group (GPUs per engine) | H200 nodes | weights per GPU (GiB) | KV per GPU (GiB) | KV tokens per GPU "
        "| KV tokens per engine | " + " | ".join(f"{n // 1024}K-token contexts per engine" for n in CONTEXT_LENGTHS)
        + " |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in CONTEXT_LENGTHS) + " |",
    ]
    for ep_size in EP_SIZES:
        rank = size_rank(args, ep_size)
        contexts = " | ".join(f"{rank.group_kv_tokens // n:,}" for n in CONTEXT_LENGTHS)
        lines.append(f"| {ep_size} | {rank.num_nodes} | {rank.weight_bytes / GIB:.1f} | "
                     f"{rank.kv_budget_bytes / GIB:.1f} | {rank.kv_tokens:,} | {rank.group_kv_tokens:,} | "
                     f"{contexts} |")
    return "\n".join(lines)


def with_table(readme: str, text: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + text + "\n" + readme[end:]


def main(argv: list[str]) -> int:
    text = table(load_args())
    if len(argv) == 2 and argv[0] in ("--write", "--check"):
        path = Path(argv[1])
        readme = path.read_text()
        updated = with_table(readme, text)
        if argv[0] == "--check":
            print("sizing table up to date" if updated == readme else f"stale sizing table in {path}")
            return 0 if updated == readme else 1
        path.write_text(updated)
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
