"""Offline throughput: k2ray's LLM.generate against transformers' generate on the same tiny model.

~100 requests of mixed prompt/output lengths (fixed seed), greedy, fp32, eos disabled on both sides
so each request produces exactly its max_tokens. transformers runs static batches (left padding; a
batch decodes until its longest request is done), twice over: in input order with --hf-batch-size
(the naive baseline), and sorted by length (--sort-key) into batches of each of --sorted-batch-sizes,
the strongest static batching transformers allows; the best of those is the headline baseline.
Output tokens/s counts only the tokens the requests asked for, for all. Prints every figure, k2ray's
ratio against each baseline, and how many requests' greedy tokens agree with k2ray's.

    python load_tests/offline_throughput.py [--num-requests 100] [--hf-batch-size 16]
        [--sorted-batch-sizes 8,16,32] [--sort-key output]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# A small DeepSeek-V3-architecture model with K2's proportions scaled down.
TINY_CONFIG = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
    n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
    qk_nope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.827, norm_topk_prob=True,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_interleave=True, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, num_mtp_layers=0,
    rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=32.0, original_max_position_embeddings=128,
                         beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)
PROMPT_LEN_RANGE = (16, 256)
OUTPUT_LEN_RANGE = (16, 128)


@torch.no_grad()
def make_checkpoint(out_dir: Path, seed: int, config: dict | None = None):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**(config or TINY_CONFIG))).float()
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:  # O(1) activations so routing and argmax are not degenerate
            param.copy_(torch.randn_like(param) / math.sqrt(param.shape[-1]))
    model.save_pretrained(out_dir)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_workload(num_requests: int, seed: int) -> tuple[list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(*PROMPT_LEN_RANGE, (num_requests,), generator=gen).tolist()
    output_lens = torch.randint(*OUTPUT_LEN_RANGE, (num_requests,), generator=gen).tolist()
    prompts = [torch.randint(2, TINY_CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in prompt_lens]
    return prompts, output_lens


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # this process's CPU: on a shared box, less noisy than wall time (both sides run 1 thread)


@dataclass(frozen=True)
class BaselineRun:
    name: str
    batch_size: int
    is_sorted: bool
    timing: Timing
    token_ids: list[list[int]]  # per request, in input order


# How --sort-key orders requests for the sorted baseline: by what a padded static batch pays for.
SORT_KEYS = {
    "output": lambda prompt, output_len: (output_len, len(prompt)),  # decode steps first, then padding
    "prompt": lambda prompt, output_len: (len(prompt), output_len),
    "total": lambda prompt, output_len: len(prompt) + output_len,
}


@torch.no_grad()
def run_transformers(model, prompts: list[list[int]], output_lens: list[int], batch_size: int,
                     order: list[int]) -> list[list[int]]:
    """Static batches of `batch_size` taken in `order`; outputs come back in input order."""
    outputs: list[list[int]] = [[] for _ in prompts]
    pad = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch, lens = [prompts[i] for i in rows], [output_lens[i] for i in rows]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), do_sample=False,
                             pad_token_id=pad)
        for i, row, n in zip(rows, gen, lens, strict=True):
            outputs[i] = row[width:width + n].tolist()
    return outputs


def transformers_baselines(args) -> list[tuple[str, int, bool]]:
    """(name, batch size, sorted) of every transformers run: the naive one, then each sorted one."""
    naive = [(f"input order, batches of {args.hf_batch_size}", args.hf_batch_size, False)]
    return naive + [(f"sorted by {args.sort_key} length, batches of {b}", b, True)
                    for b in args.sorted_batch_sizes]


def run_k2ray(checkpoint: Path, prompts: list[list[int]], output_lens: list[int],
              args) -> tuple[Timing, list[list[int]]]:
    from k2ray import LLM, SamplingParams

    llm = LLM(str(checkpoint), skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start, start_cpu = time.perf_counter(), time.process_time()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    timing = Timing(time.perf_counter() - start, time.process_time() - start_cpu)
    return timing, [r.outputs[0].token_ids for r in results]


def time_transformers(model, prompts: list[list[int]], output_lens: list[int], args) -> list[BaselineRun]:
    run_transformers(model, prompts[:2], [4, 4], 2, [0, 1])  # warm-up
    key = SORT_KEYS[args.sort_key]
    by_length = sorted(range(len(prompts)), key=lambda i: key(prompts[i], output_lens[i]))
    runs = []
    for name, batch_size, is_sorted in transformers_baselines(args):
        order = by_length if is_sorted else list(range(len(prompts)))
        start, start_cpu = time.perf_counter(), time.process_time()
        token_ids = run_transformers(model, prompts, output_lens, batch_size, order)
        timing = Timing(time.perf_counter() - start, time.process_time() - start_cpu)
        runs.append(BaselineRun(name, batch_size, is_sorted, timing, token_ids))
    return runs


def summarize(k2ray: Timing, k2ray_token_ids: list, runs: list[BaselineRun], num_output_tokens: int) -> dict:
    baselines = []
    for run in runs:
        # Greedy fp32 on both sides: count requests whose tokens agree exactly (padding may flip a near-tie).
        same = sum(a == b for a, b in zip(k2ray_token_ids, run.token_ids, strict=True))
        baselines.append({
            "name": run.name, "batch_size": run.batch_size, "is_sorted": run.is_sorted,
            "transformers_s": round(run.timing.wall_s, 2), "transformers_cpu_s": round(run.timing.cpu_s, 2),
            "transformers_output_tok_s": round(num_output_tokens / run.timing.wall_s, 1),
            "ratio": round(run.timing.wall_s / k2ray.wall_s, 2),
            "cpu_ratio": round(run.timing.cpu_s / k2ray.cpu_s, 2), "identical_requests": same,
        })
    strongest = min((b for b in baselines if b["is_sorted"]), key=lambda b: b["transformers_s"])
    return {"k2ray_s": round(k2ray.wall_s, 2), "k2ray_cpu_s": round(k2ray.cpu_s, 2),
            "k2ray_output_tok_s": round(num_output_tokens / k2ray.wall_s, 1), "baselines": baselines,
            "headline": strongest["name"], "ratio_vs_strongest": strongest["ratio"],
            "ratio_vs_naive": baselines[0]["ratio"]}


def print_result(result: dict) -> None:
    n = result["num_requests"]
    print(f"k2ray LLM.generate{'':<32} {result['k2ray_output_tok_s']:>7.1f} output tok/s "
          f"({result['k2ray_s']:.1f} s, {result['k2ray_cpu_s']:.1f} s CPU)")
    for b in result["baselines"]:
        mark = "  <- headline" if b["name"] == result["headline"] else ""
        print(f"transformers, {b['name']:<36} {b['transformers_output_tok_s']:>7.1f} output tok/s "
              f"({b['transformers_s']:.1f} s, {b['transformers_cpu_s']:.1f} s CPU): k2ray {b['ratio']}x "
              f"({b['cpu_ratio']}x by CPU), identical greedy outputs {b['identical_requests']}/{n}{mark}")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16, help="the input-order baseline's batch size")
    parser.add_argument("--sorted-batch-sizes", type=lambda text: [int(b) for b in text.split(",")],
                        default=[8, 16, 32])
    # output first: of the three keys, the least transformers CPU time on the default workload.
    parser.add_argument("--sort-key", choices=sorted(SORT_KEYS), default="output")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    # Both sides run with the same intra-op thread count; 1 keeps small-op timings stable on a shared
    # CPU box, where OpenMP workers spin against other processes.
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    prompts, output_lens = make_workload(args.num_requests, args.seed)
    num_output_tokens = sum(output_lens)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "tiny-deepseek-v3"
        model = make_checkpoint(checkpoint, args.seed)
        k2ray, k2ray_tokens = run_k2ray(checkpoint, prompts, output_lens, args)
        runs = time_transformers(model, prompts, output_lens, args)
    result = {"num_requests": args.num_requests, "num_prompt_tokens": sum(map(len, prompts)),
              "num_output_tokens": num_output_tokens, "torch_threads": args.torch_threads,
              **summarize(k2ray, k2ray_tokens, runs, num_output_tokens)}
    print_result(result)


if __name__ == "__main__":
    main()
