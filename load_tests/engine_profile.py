"""Where an engine step's time goes: input preparation, attention, MoE, the other layers, logits and
sampling, scheduling and output processing, for a prefill-heavy and a decode-heavy load.

    python load_tests/engine_profile.py [--threads 1] [--num-requests 24] [--loads prefill,decode]

The model is the checkpoint of the vLLM comparison (a random DeepSeek-V3 with hidden 256, 4 layers, 8 heads,
16 routed experts top-4, kv_lora_rank 512 + rope 64 as in K2, vocab 4096, fp32), built from a seed. The
engine runs offline (`LLM.generate`, greedy) with timers wrapped around its own methods and modules: the
step, the scheduler, the runner's input preparation, the model forward and each layer's attention and
MoE, the logits and the sampler. "Other layers" is the forward minus attention and MoE (embedding, norms,
dense MLPs); "output processing" is the step minus scheduling and the runner. On CPU every timed call
finishes before it returns, so the shares add up; on CUDA each timer synchronises first (slower, but the
split stays true). Prints one table per load and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from offline_throughput import TINY_CONFIG, make_checkpoint

# The issue's comparison checkpoint: TINY_CONFIG with K2's latent widths and a larger vocabulary.
PROFILE_CONFIG = {**TINY_CONFIG, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "vocab_size": 4096}
# (prompt length range, output length range) per load.
LOADS = {"prefill": ((384, 768), (2, 4)), "decode": ((16, 48), (96, 160))}
PARTS = ("scheduling", "input_prep", "attention", "moe", "other_layers", "logits_and_sampling",
         "output_processing")


class StepTimers:
    """Seconds per part, accumulated by wrappers around one engine's methods and modules."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.num_steps = 0
        self._sync = sync

    @contextmanager
    def timing(self, part: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[part] += time.perf_counter() - start

    def wrap(self, owner: object, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.timing(part):
                return inner(*args, **kwargs)

        setattr(owner, name, timed)

    def hook(self, module: torch.nn.Module, part: str) -> None:
        starts: list[float] = []

        def before(_module, _args):
            self._sync()
            starts.append(time.perf_counter())

        def after(_module, _args, _output):
            self._sync()
            self.seconds[part] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def breakdown(self) -> dict[str, float]:
        """The exclusive seconds of each part (nested timers subtracted)."""
        s = self.seconds
        forward_only = s["forward"] - s["attention"] - s["moe"]
        runner_rest = s["execute_model"] - s["input_prep"] - s["forward"] - s["logits_and_sampling"]
        return {"scheduling": s["scheduling"], "input_prep": s["input_prep"] + runner_rest,
                "attention": s["attention"], "moe": s["moe"], "other_layers": forward_only,
                "logits_and_sampling": s["logits_and_sampling"],
                "output_processing": s["step"] - s["scheduling"] - s["execute_model"]}


def instrument(engine, timers: StepTimers) -> None:
    """Timers around the engine's step and its parts (the engine keeps working as before)."""
    from k2ray.model.deepseek_v3 import MoE

    runner, model = engine.model_runner, engine.model_runner.model
    step = engine.step

    def counted_step():
        timers.num_steps += 1
        with timers.timing("step"):
            return step()

    engine.step = counted_step
    timers.wrap(engine.scheduler, "schedule", "scheduling")
    timers.wrap(runner, "execute_model", "execute_model")
    timers.wrap(runner, "_prepare_inputs", "input_prep")
    timers.wrap(runner, "sampler", "logits_and_sampling")
    timers.wrap(model, "compute_logits", "logits_and_sampling")
    timers.hook(model, "forward")
    for layer in model.layers:
        timers.hook(layer.attn, "attention")
        if isinstance(layer.ffn, MoE):
            timers.hook(layer.ffn, "moe")


def workload(load: str, num_requests: int, seed: int) -> tuple[list[list[int]], list[int]]:
    (prompt_lo, prompt_hi), (out_lo, out_hi) = LOADS[load]
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(prompt_lo, prompt_hi, (num_requests,), generator=gen).tolist()
    output_lens = torch.randint(out_lo, out_hi, (num_requests,), generator=gen).tolist()
    vocab_size = PROFILE_CONFIG["vocab_size"]
    return [torch.randint(2, vocab_size, (n,), generator=gen).tolist() for n in prompt_lens], output_lens


def profile(checkpoint: Path, load: str, args: argparse.Namespace) -> dict:
    from k2ray import LLM, SamplingParams

    llm = LLM(str(checkpoint), skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16, device=args.device,
              tune_host_malloc=args.tune_host_malloc)
    prompts, output_lens = workload(load, args.num_requests, args.seed)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    sync = torch.cuda.synchronize if llm.llm_engine.model_runner.device.type == "cuda" else (lambda: None)
    timers = StepTimers(sync)
    instrument(llm.llm_engine, timers)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    wall_s = time.perf_counter() - start
    parts = timers.breakdown()
    return {"load": load, "num_steps": timers.num_steps, "wall_s": wall_s, "step_s": timers.seconds["step"],
            "num_prompt_tokens": sum(map(len, prompts)), "num_output_tokens": sum(output_lens), "parts_s": parts}


def print_report(report: dict) -> None:
    step_s, num_steps = report["step_s"], max(report["num_steps"], 1)
    print(f"\n{report['load']}-heavy: {report['num_prompt_tokens']} prompt and {report['num_output_tokens']} "
          f"output tokens in {report['num_steps']} steps, {report['wall_s']:.2f} s wall, "
          f"{step_s / num_steps * 1e3:.2f} ms per step")
    print(f"{'part':<22}{'s':>9}{'share':>8}{'ms/step':>10}")
    for part in PARTS:
        seconds = report["parts_s"][part]
        print(f"{part:<22}{seconds:>9.3f}{seconds / step_s:>8.1%}{seconds / num_steps * 1e3:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), args.seed, PROFILE_CONFIG)
        reports = [profile(Path(tmp), load, args) for load in args.loads]
    for report in reports:
        print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "reports": reports}, indent=2))


def _loads(text: str) -> list[str]:
    loads = [item for item in text.split(",") if item]
    if not loads or any(load not in LOADS for load in loads):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(LOADS)}")
    return loads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--loads", type=_loads, default=list(LOADS))
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (CUDA when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-host-malloc", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc malloc tuning (k2ray/engine/host_allocator.py)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "engine_profile.json"))
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
