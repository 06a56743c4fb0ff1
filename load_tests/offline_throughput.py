"""Offline throughput: k2ray's LLM.generate against transformers' generate on the same tiny model.

~100 requests of mixed prompt/output lengths (fixed seed), greedy, fp32, eos disabled on both sides
so each request produces exactly its max_tokens. transformers runs static batches in input order
(left padding; a batch decodes until its longest request is done). Output tokens/s counts only the
tokens the requests asked for, for both. Prints both figures and the ratio (target >= 3x).

    python load_tests/offline_throughput.py [--num-requests 100] [--hf-batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
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
def make_checkpoint(out_dir: Path, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_CONFIG)).float()
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


@torch.no_grad()
def run_transformers(model, prompts: list[list[int]], output_lens: list[int], batch_size: int) -> list[list[int]]:
    outputs = []
    pad = 0
    for start in range(0, len(prompts), batch_size):
        batch, lens = prompts[start:start + batch_size], output_lens[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), do_sample=False,
                             pad_token_id=pad)
        outputs.extend(row[width:width + n].tolist() for row, n in zip(gen, lens, strict=True))
    return outputs


def run_k2ray(checkpoint: Path, prompts: list[list[int]], output_lens: list[int], args) -> tuple[float, list]:
    from k2ray import LLM, SamplingParams

    llm = LLM(str(checkpoint), skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return time.perf_counter() - start, [r.outputs[0].token_ids for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16)
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
        k2ray_s, k2ray_tokens = run_k2ray(checkpoint, prompts, output_lens, args)
        run_transformers(model, prompts[:2], [4, 4], 2)  # warm-up
        start = time.perf_counter()
        hf_tokens = run_transformers(model, prompts, output_lens, args.hf_batch_size)
        hf_s = time.perf_counter() - start
    # Greedy fp32 on both sides: count requests whose tokens agree exactly (padding may flip a near-tie).
    same = sum(a == b for a, b in zip(k2ray_tokens, hf_tokens, strict=True))
    result = {
        "num_requests": args.num_requests, "num_prompt_tokens": sum(map(len, prompts)),
        "num_output_tokens": num_output_tokens, "hf_batch_size": args.hf_batch_size,
        "torch_threads": args.torch_threads,
        "k2ray_s": round(k2ray_s, 2), "transformers_s": round(hf_s, 2),
        "k2ray_output_tok_s": round(num_output_tokens / k2ray_s, 1),
        "transformers_output_tok_s": round(num_output_tokens / hf_s, 1),
        "ratio": round(hf_s / k2ray_s, 2), "identical_requests": same,
    }
    print(f"k2ray        {result['k2ray_output_tok_s']:>9.1f} output tok/s ({k2ray_s:.1f} s)")
    print(f"transformers {result['transformers_output_tok_s']:>9.1f} output tok/s ({hf_s:.1f} s, "
          f"static batches of {args.hf_batch_size})")
    print(f"ratio {result['ratio']}x; identical greedy outputs: {same}/{args.num_requests}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
