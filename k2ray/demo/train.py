"""Trains the embedded demo model and writes it in K2 Thinking's format (`make demo-model`).

    python -m k2ray.demo.train [--out DIR] [--steps N] [--seed S]

CPU only and deterministic from the seed: tokenizer from the demo corpus, synthetic conversations, AdamW on
assistant tokens only, then INT4 routed experts, and held-out accuracy through k2ray's engine at full
precision and INT4 (the quality INT4 costs).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from k2ray.api.chat_template import TEMPLATE_FILE, ChatTemplate
from k2ray.api.tokenizer import VOCAB_FILE, K2Tokenizer, load_tiktoken_ranks

from .conversations import training_conversations
from .encode import Sequence, encode
from .hf_training import RouterBalancer, batch_loss, build_model
from .model_io import DEMO_SIZES, demo_config, write_demo_checkpoint
from .tokenizer import NUM_MERGES, write_demo_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_OUT = ASSETS / "k2-demo"
TEMPLATE_SOURCE = ASSETS / "k2-tiny" / TEMPLATE_FILE
NUM_SPECIAL_TOKENS = 256


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 2400
    batch_size: int = 16
    lr: float = 4e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_conversations: int = 24000
    num_threads: int = 2
    num_merges: int = NUM_MERGES
    num_tokenizer_conversations: int = 1500
    num_eval_cases: int = 10  # per task, through the engine, at full precision and INT4 (0: skip)
    sizes: tuple[tuple[str, int], ...] = tuple(DEMO_SIZES.items())


def _lr(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _prefix_len(tokenizer: K2Tokenizer, seq: Sequence) -> int:
    """Tokens before the first user turn: tool declarations and system prompt, shared by many sequences."""
    return seq.token_ids.index(tokenizer.token_id("<|im_user|>"))


def build_batches(tokenizer: K2Tokenizer, sequences: list[Sequence], batch_size: int,
                  rng: random.Random) -> list[tuple[list[int], list[Sequence]]]:
    """Sequences grouped by shared prefix, then by length, cut into batches (in a seeded random order)."""
    groups: dict[tuple[int, ...], list[Sequence]] = defaultdict(list)
    for seq in sequences:
        groups[tuple(seq.token_ids[:_prefix_len(tokenizer, seq)])].append(seq)
    batches = []
    for prefix, group in groups.items():
        rng.shuffle(group)
        group.sort(key=lambda s: len(s.token_ids) // 32)  # similar lengths together, little padding
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            batches.append((list(prefix), [Sequence(s.token_ids[len(prefix):], s.loss_mask[len(prefix):])
                                           for s in chunk]))
    rng.shuffle(batches)
    return batches


def prepare_assets(out_dir: Path, config: TrainConfig) -> tuple[K2Tokenizer, dict]:
    """Tokenizer files, chat template and the model config (without weights) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_demo_tokenizer(out_dir, config.num_merges, config.num_tokenizer_conversations)
    shutil.copyfile(TEMPLATE_SOURCE, out_dir / TEMPLATE_FILE)
    num_base = len(load_tiktoken_ranks(out_dir / VOCAB_FILE))
    k2_config = demo_config(num_base, num_base + NUM_SPECIAL_TOKENS, dict(config.sizes))
    return K2Tokenizer.from_pretrained(out_dir), k2_config


def train(out_dir: Path, config: TrainConfig) -> dict:
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    started = time.monotonic()
    tokenizer, k2_config = prepare_assets(out_dir, config)
    template = ChatTemplate()
    conversations = training_conversations(config.num_conversations, config.seed)
    sequences = [encode(tokenizer, template, c) for c in conversations]
    rng = random.Random(config.seed)
    model = build_model(k2_config, config.seed)
    balancer = RouterBalancer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    batches: list = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc="demo-model", unit="step", dynamic_ncols=True)
    for step in bar:
        if not batches:
            batches = build_batches(tokenizer, sequences, config.batch_size, rng)
        prefix, chunk = batches.pop()
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step)
        loss = batch_loss(model, prefix, [s.token_ids for s in chunk], [s.loss_mask for s in chunk])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        balancer.step()
        losses.append(loss.item())
        recent = losses[-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{_lr(config, step):.2e}")
    bar.close()
    train_s = time.monotonic() - started
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_demo_checkpoint(out_dir, k2_config, state)
    recent = losses[-50:]
    summary = {"train_wall_s": round(train_s, 1), "final_loss": round(sum(recent) / max(1, len(recent)), 4),
               "num_params": sum(p.numel() for p in model.parameters()), "config": asdict(config)}
    if config.num_eval_cases:
        from .quality import compare_precisions

        with tempfile.TemporaryDirectory() as dense_dir:
            summary["accuracy"] = compare_precisions(out_dir, Path(dense_dir), k2_config, state,
                                                     config.num_eval_cases, config.seed)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--num-conversations", type=int, default=defaults.num_conversations)
    parser.add_argument("--eval-cases", type=int, default=defaults.num_eval_cases)
    opts = parser.parse_args(argv)
    config = replace(defaults, seed=opts.seed, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                     num_conversations=opts.num_conversations, num_eval_cases=opts.eval_cases)
    summary = train(opts.out, config)
    print(f"demo model -> {opts.out}: {summary['train_wall_s']} s, final loss {summary['final_loss']}, "
          f"{summary['num_params']} parameters")
    for task, row in summary.get("accuracy", {}).items():
        print(f"  {task:<11} full precision {row['full']:.2f}   INT4 {row['int4']:.2f}")


if __name__ == "__main__":
    main()
