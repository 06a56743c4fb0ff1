"""One rank of an EP group in its own process: k2-tiny sharded over the group, its own sequences on a paged
cache, the steps of a schedule run in lockstep with the other ranks (a step may have no tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2ray.dist.ep_group import EPGroup, EPGroupSpec
from k2ray.dist.moe_dispatch import AllToAllDispatch
from k2ray.model.args import ModelArgs
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.expert_map import ExpertMap
from k2ray.model.loader import load_model

# One step: (sequence, its new tokens); decodes (one token of a cached sequence) first.
Step = list[tuple[str, list[int]]]
NUM_BLOCKS = 64
BLOCK_SIZE = 4


@dataclass(frozen=True)
class RankArgs:
    checkpoint: str
    spec: EPGroupSpec | None  # None: the single-process model
    timeout_s: float
    steps: list[Step]
    device: str = "cpu"
    kernel_backend: str = "torch"
    pack_experts: bool = False
    placement: str | None = None  # an EPLB placement JSON (redundant experts)


class TinyPagedRunner:
    """Paged forward of one rank's sequences; an empty step still runs the model (and its collectives)."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = model.embed.weight.device
        self.kv_caches = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, model.args.kv_cache_dim, dtype=model.dtype,
                                      device=self.device) for _ in model.layers]
        self.next_block = 1  # block 0 pads the block tables
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def _place(self, seq: str, num_new: int) -> tuple[list[int], list[int]]:
        table, start = self.tables.setdefault(seq, []), self.lens.get(seq, 0)
        while len(table) * BLOCK_SIZE < start + num_new:
            table.append(self.next_block)
            self.next_block += 1
        positions = list(range(start, start + num_new))
        self.lens[seq] = start + num_new
        return positions, [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    @torch.no_grad()
    def step(self, batch: Step) -> dict[str, torch.Tensor]:
        num_decodes = sum(1 for seq, toks in batch if len(toks) == 1 and seq in self.lens)
        ids, positions, slots, qsl = [], [], [], [0]
        for seq, toks in batch:
            pos, slot = self._place(seq, len(toks))
            ids, positions, slots = ids + toks, positions + pos, slots + slot
            qsl.append(qsl[-1] + len(toks))
        seq_lens = [self.lens[seq] for seq, _ in batch]
        width = max((len(self.tables[seq]) for seq, _ in batch), default=1)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in batch]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, device=dev), seq_lens=torch.tensor(seq_lens, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev).view(len(batch), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), num_decodes=num_decodes,
            max_seq_len=max(seq_lens, default=0), query_start_loc_cpu=tuple(qsl), seq_lens_cpu=tuple(seq_lens),
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        return {seq: logits[qsl[i]:qsl[i + 1]] for i, (seq, _) in enumerate(batch)}


def load(args: RankArgs, expert_dispatch=None, ep_rank: int = 0, ep_size: int = 1):
    return load_model(args.checkpoint, dtype=torch.float32, device=args.device, kernel_backend=args.kernel_backend,
                      ep_rank=ep_rank, ep_size=ep_size, expert_dispatch=expert_dispatch,
                      pack_experts=args.pack_experts, ep_placement=args.placement)


def run_steps(model, steps: list[Step]) -> tuple[list[dict], list]:
    """Per step: each sequence's logits (numpy, float32) and the step's expert token counts [layers, E]."""
    logits, counts, _ = run_steps_with_load(model, steps)
    return logits, counts


def run_steps_with_load(model, steps: list[Step]) -> tuple[list[dict], list, list]:
    """run_steps, plus each step's tokens per physical expert [layers, P] (rank-major physical ids)."""
    runner = TinyPagedRunner(model)
    model.take_expert_load()
    logits, counts, physical = [], [], []
    for batch in steps:
        out = runner.step(batch)
        logits.append({seq: x.cpu().numpy() for seq, x in out.items()})
        load = model.take_expert_load()
        counts.append(load.logical.cpu().numpy())
        physical.append(load.physical.cpu().numpy())
    return logits, counts, physical


def serve_rank(index: int, args: RankArgs, results) -> None:
    """Run the steps (as an EP rank, or as the single-process model when `args.spec` is None) and put
    (index, result or error text) on `results`."""
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dispatch = None
        if args.spec is None:
            model = load(args)
        else:
            n_experts = ModelArgs.from_checkpoint(args.checkpoint).n_routed_experts
            num_redundant = 0 if args.placement is None else ExpertMap.load(args.placement).num_redundant_experts
            dispatch = AllToAllDispatch(EPGroup(args.spec, device, args.timeout_s), n_experts, num_redundant)
            model = load(args, dispatch, args.spec.rank, args.spec.world_size)
        logits, counts, physical = run_steps_with_load(model, args.steps)
        num_sent_rows = 0 if dispatch is None else dispatch.num_sent_rows
        results.put((index, {"logits": logits, "counts": counts, "physical": physical,
                             "num_sent_rows": num_sent_rows}))
    except Exception as exc:  # noqa: BLE001 - the test reports the rank's error instead of timing out
        results.put((index, f"{type(exc).__name__}: {exc}"))
