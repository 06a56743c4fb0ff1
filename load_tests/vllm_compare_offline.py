"""One offline run for vllm_compare.py, in a process of its own: load the engine, warm up, time LLM.generate.

    <python> vllm_compare_offline.py --engine k2ray|k2ray-compile|vllm --model DIR --workload W.json
        --threads N --out RESULT.json [--max-num-seqs ...]

Runs under vLLM's own venv as well as k2ray's, so only the standard library is imported at the top. The
workload file holds {"prompts": [[ids]], "output_lens": [n]}; every request is greedy with eos ignored, so
each produces exactly its output length. The result holds load/generate wall and CPU seconds, output tok/s
and every request's output ids (for the identical-output share).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

WARMUP_PROMPT = [7, 8, 9, 10, 11, 12, 13, 14]
WARMUP_TOKENS = 4
# k2ray: its defaults; -eager / -compile: the compiled forward forced off / on (EngineConfig.compile).
ENGINES = ("k2ray", "k2ray-eager", "k2ray-compile", "vllm")
COMPILE_OF_ENGINE = {"k2ray": None, "k2ray-eager": False, "k2ray-compile": True}
# vLLM picks AMX_MLA where the CPU has AMX tiles, which takes bf16/int8 weights only; CPU_MLA runs fp32.
VLLM_ATTENTION_BACKEND = "CPU_MLA"


def run_k2ray(args: argparse.Namespace, prompts: list[list[int]], output_lens: list[int],
              compile_forward: bool | None) -> tuple[float, tuple[float, float], list[list[int]]]:
    import torch

    from k2ray import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    forced = {} if compile_forward is None else {"compile": compile_forward}
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_bytes, **forced)
    llm.generate([{"prompt_token_ids": WARMUP_PROMPT}], SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS))
    load_s = time.perf_counter() - start
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    gen_s, outputs = _timed(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params))
    return load_s, gen_s, [list(out.outputs[0].token_ids) for out in outputs]


def run_vllm(args: argparse.Namespace, prompts: list[list[int]],
             output_lens: list[int]) -> tuple[float, tuple[float, float], list[list[int]]]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len, seed=0,
              attention_backend=VLLM_ATTENTION_BACKEND)
    llm.generate([{"prompt_token_ids": WARMUP_PROMPT}], SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS),
                 use_tqdm=False)
    load_s = time.perf_counter() - start
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    gen_s, outputs = _timed(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                 use_tqdm=False))
    return load_s, gen_s, [list(out.outputs[0].token_ids) for out in outputs]


def _timed(fn):
    """(wall s, this process's CPU s, fn()). CPU time is less noisy on a shared box, but vLLM's engine core is a
    child process: only k2ray's figure (its whole engine in this process) is the engine's."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - start, time.process_time() - start_cpu), result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = json.loads(args.workload.read_text())
    prompts, output_lens = workload["prompts"], workload["output_lens"]
    cpu_start = time.process_time()
    if args.engine == "vllm":
        load_s, (gen_s, gen_cpu_s), token_ids = run_vllm(args, prompts, output_lens)
    else:
        load_s, (gen_s, gen_cpu_s), token_ids = run_k2ray(args, prompts, output_lens, COMPILE_OF_ENGINE[args.engine])
    num_output = sum(len(ids) for ids in token_ids)
    result = {"engine": args.engine, "threads": args.threads, "pid": os.getpid(), "load_s": load_s,
              "generate_s": gen_s, "cpu_s": time.process_time() - cpu_start,
              "generate_cpu_s": gen_cpu_s, "num_output_tokens": num_output,
              "output_tok_s": num_output / gen_s, "token_ids": token_ids}
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard keeps them from rerunning this
    main()
