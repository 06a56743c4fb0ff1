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
NUM_BASE_TOKENS, VOCAB_SIZE = 3328, 3584  # the committed demo tokenizer's layout


@dataclass(frozen=True)
class ProbeConfig:
    num_distinct: int = 64
    steps: int = 400
    seq_len: int = 8
    filler_len: int = 20
    batch_size: int = 16
    lr: float = 4e-3
    seed: int = 0
    num_threads: int = 2
    log_every: int = 50
    is_llama: bool = False
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


def _batch(config: ProbeConfig, gen: torch.Generator) -> torch.Tensor:
    shape = (config.batch_size, config.seq_len)
    ids = torch.randint(FIRST_ID, FIRST_ID + config.num_distinct, shape, generator=gen)
    filler = torch.randint(FIRST_ID, NUM_BASE_TOKENS, (config.batch_size, config.filler_len), generator=gen)
    separator = torch.full((config.batch_size, 1), NUM_BASE_TOKENS + 1)
    return torch.cat([ids, filler, separator, ids], dim=1)


def probe(config: ProbeConfig) -> list[tuple[int, float, float]]:
    """(step, loss on the repeat, accuracy on the repeat after its first id) every `log_every` steps."""
    model = _model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(config.seed)
    start = config.seq_len + config.filler_len + 1  # the repeat's first position
    rows = []
    for step in range(1, config.steps + 1):
        ids = _batch(config, gen)
        logits = model(input_ids=ids).logits
        predicted = logits[:, start - 1:-1]  # position j predicts id j + 1
        loss = F.cross_entropy(predicted.reshape(-1, logits.shape[-1]), ids[:, start:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.log_every == 0:
            accuracy = (predicted[:, 1:].argmax(-1) == ids[:, start + 1:]).float().mean().item()
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
    opts = parser.parse_args(argv)
    config = ProbeConfig(num_distinct=opts.num_distinct, steps=opts.steps, lr=opts.lr, seed=opts.seed,
                         is_llama=opts.llama, sizes=tuple(opts.size))
    torch.set_num_threads(config.num_threads)
    print(f"{'llama' if config.is_llama else 'demo (MLA)'} sizes {DEMO_SIZES | dict(config.sizes)}")
    for step, loss, accuracy in probe(config):
        print(f"step {step:>5}  loss {loss:.3f}  copy accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
