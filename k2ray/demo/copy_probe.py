"""Can a model of the demo's sizes learn to copy? A probe for choosing them (`python -m k2ray.demo.copy_probe`).

Each sequence is `seq_len` random ids out of `num_distinct`, a random filler, a separator, then the same ids
again; the loss is on the repeat. Predicting a repeated id after the first needs an induction circuit, the one
the demo's tool calls need to copy a city's name from the question into the arguments. It prints the loss and
that accuracy every `log_every` steps; `--llama` trains transformers' Llama at the same width and depth, the
baseline that MLA's low-rank latent (`kv_lora_rank`) is measured against.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .hf_training import build_model
from .model_io import DEMO_SIZES, demo_config

FIRST_ID = 300  # random ids start above the byte tokens, as name pieces do
NUM_BASE_TOKENS, VOCAB_SIZE = 3328, 3584  # the probe's fixed layout (the demo tokenizer's before whole cities)


@dataclass(frozen=True)
class CopyTask:
    """`seq_len` random ids out of [first_id, first_id + num_distinct), a filler, a separator, the ids again.

    Shifted, the ids start at a random offset into the filler, after a separator of their own: the distance
    from the ids to their repeat then differs row to row, so attending a fixed distance back (which RoPE
    makes easy, and which copies nothing in a conversation) no longer solves it; only finding the previous
    occurrence of the current id and reading the next one does."""

    num_distinct: int = 64
    seq_len: int = 8
    filler_len: int = 20
    first_id: int = FIRST_ID
    num_base_tokens: int = NUM_BASE_TOKENS  # filler ids are drawn below it
    separator_id: int = NUM_BASE_TOKENS + 1
    is_shifted: bool = False

    @property
    def repeat_start(self) -> int:
        return self.seq_len + self.filler_len + 1 + int(self.is_shifted)


def copy_batch(task: CopyTask, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(task.first_id, task.first_id + task.num_distinct, (batch_size, task.seq_len), generator=gen)
    filler = torch.randint(task.first_id, task.num_base_tokens, (batch_size, task.filler_len), generator=gen)
    separator = torch.full((batch_size, 1), task.separator_id)
    if not task.is_shifted:
        return torch.cat([ids, filler, separator, ids], dim=1)
    shifts = torch.randint(0, task.filler_len + 1, (batch_size,), generator=gen).tolist()
    rows = [torch.cat([f[:n], separator[0], i, f[n:], separator[0], i])
            for f, i, n in zip(filler, ids, shifts, strict=True)]
    return torch.stack(rows)


def copy_loss(model: torch.nn.Module, task: CopyTask, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss on the repeat, accuracy on the repeat after its first id, which needs the copy circuit)."""
    start = task.repeat_start
    predicted = model(input_ids=ids).logits[:, start - 1:-1]  # position j predicts id j + 1
    loss = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ids[:, start:].reshape(-1))
    accuracy = (predicted[:, 1:].argmax(-1) == ids[:, start + 1:]).float().mean().item()
    return loss, accuracy


@dataclass(frozen=True)
class ProbeConfig:
    num_distinct: int = 64
    steps: int = 400
    batch_size: int = 16
    lr: float = 4e-3
    seed: int = 0
    num_threads: int = 2
    log_every: int = 50
    is_llama: bool = False
    is_shifted: bool = False
    sizes: tuple[tuple[str, int], ...] = ()  # overrides of DEMO_SIZES


def _model(config: ProbeConfig) -> torch.nn.Module:
    sizes = DEMO_SIZES | dict(config.sizes)
    if not config.is_llama:
        return build_model(demo_config(NUM_BASE_TOKENS, VOCAB_SIZE, sizes), config.seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=sizes["hidden_size"], intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"], num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"]))


def probe(config: ProbeConfig) -> list[tuple[int, float, float]]:
    """(step, loss on the repeat, accuracy on the repeat after its first id) every `log_every` steps."""
    model = _model(config)
    task = CopyTask(num_distinct=config.num_distinct, is_shifted=config.is_shifted)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(config.seed)
    rows = []
    for step in range(1, config.steps + 1):
        loss, accuracy = copy_loss(model, task, copy_batch(task, config.batch_size, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.log_every == 0:
            rows.append((step, loss.item(), accuracy))
    return rows


def _size(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in DEMO_SIZES or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=INT with NAME one of DEMO_SIZES, got {text!r}")
    return name, int(value)


def main(argv: list[str] | None = None) -> None:
    defaults = ProbeConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-distinct", type=int, default=defaults.num_distinct)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--size", type=_size, action="append", default=[], help="NAME=INT over DEMO_SIZES")
    parser.add_argument("--llama", action="store_true", help="transformers' Llama at the same width and depth")
    parser.add_argument("--shifted", action="store_true", help="the ids at a random offset (CopyTask.is_shifted)")
    opts = parser.parse_args(argv)
    config = ProbeConfig(num_distinct=opts.num_distinct, steps=opts.steps, lr=opts.lr, seed=opts.seed,
                         is_llama=opts.llama, is_shifted=opts.shifted, sizes=tuple(opts.size))
    torch.set_num_threads(config.num_threads)
    print(f"{'llama' if config.is_llama else 'demo (MLA)'} sizes {DEMO_SIZES | dict(config.sizes)}")
    for step, loss, accuracy in probe(config):
        print(f"step {step:>5}  loss {loss:.3f}  copy accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
