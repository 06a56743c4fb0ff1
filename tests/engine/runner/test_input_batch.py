"""The persistent input batch: rows kept across steps as requests join, leave and come back in any order give
the inputs a per-token Python build gives (positions, slot mapping, block tables, offsets), and the sparse
penalty counts it keeps step by step penalise exactly as dense [B, V] counts rebuilt from the token lists."""

from __future__ import annotations

import random

import torch

from k2ray.engine.outputs import ScheduledSequence
from k2ray.engine.runner import input_batch as input_batch_module
from k2ray.engine.runner.input_batch import INITIAL_NUM_ROWS, InputBatch
from k2ray.engine.runner.penalty_counts import apply_penalties
from k2ray.engine.runner.sampler import Sampler
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4
VOCAB = 32
CPU = torch.device("cpu")


def new_batch() -> InputBatch:
    return InputBatch(BLOCK_SIZE, VOCAB, CPU, prefill_context_chunk=64)


def reference_inputs(seqs: list[ScheduledSequence]) -> dict:
    """The inputs built token by token (the runner's former Python loop)."""
    input_ids, positions, slots, query_start_loc, seq_lens, logits_indices = [], [], [], [0], [], []
    for seq in seqs:
        start, num_new = seq.num_computed_tokens, len(seq.token_ids)
        input_ids += seq.token_ids
        positions += range(start, start + num_new)
        slots += [seq.block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + num_new)]
        query_start_loc.append(query_start_loc[-1] + num_new)
        seq_lens.append(start + num_new)
        if seq.sample:
            logits_indices.append(query_start_loc[-1] - 1)
    width = max(len(seq.block_ids) for seq in seqs)
    return {"input_ids": input_ids, "positions": positions, "slot_mapping": slots,
            "query_start_loc": query_start_loc, "seq_lens": seq_lens, "logits_indices": logits_indices,
            "block_tables": [seq.block_ids + [0] * (width - len(seq.block_ids)) for seq in seqs],
            "num_decodes": sum(len(seq.token_ids) == 1 for seq in seqs)}


def batch_inputs(batch: InputBatch, seqs: list[ScheduledSequence]) -> dict:
    inputs = batch.prepare_inputs(seqs)
    meta = inputs.attn_metadata
    assert meta.block_tables.dtype == torch.int32
    assert meta.query_start_loc_cpu == tuple(meta.query_start_loc.tolist())
    assert meta.seq_lens_cpu == tuple(meta.seq_lens.tolist()) and meta.max_seq_len == max(meta.seq_lens_cpu)
    assert inputs.sampled_ids == [seq.request_id for seq in seqs if seq.sample]
    return {"input_ids": inputs.input_ids.tolist(), "positions": inputs.positions.tolist(),
            "slot_mapping": meta.slot_mapping.tolist(), "query_start_loc": meta.query_start_loc.tolist(),
            "seq_lens": meta.seq_lens.tolist(), "logits_indices": inputs.logits_indices.tolist(),
            "block_tables": meta.block_tables.tolist(), "num_decodes": meta.num_decodes}


class Request:
    """A request's progress as a scheduler would drive it: prefill chunks, then decodes, blocks on demand."""

    def __init__(self, request_id: str, rng: random.Random, free_blocks: list[int]) -> None:
        self.request_id = request_id
        self.token_ids = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 23))]
        self.num_prompt = len(self.token_ids)
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.free_blocks = free_blocks

    def schedule(self, rng: random.Random) -> ScheduledSequence:
        remaining = len(self.token_ids) - self.num_computed
        num_new = remaining if remaining == 1 else rng.randint(1, remaining)
        while len(self.block_ids) * BLOCK_SIZE < self.num_computed + num_new:
            self.block_ids.append(self.free_blocks.pop())
        seq = ScheduledSequence(self.request_id, self.num_computed, self.token_ids[self.num_computed:][:num_new],
                                list(self.block_ids), self.num_computed + num_new == len(self.token_ids))
        self.num_computed += num_new
        if seq.sample:
            self.token_ids.append(rng.randrange(VOCAB))
        return seq

    def preempt(self) -> None:
        self.free_blocks[:0] = self.block_ids
        self.block_ids, self.num_computed = [], 0


def test_join_leave_reorder_match_a_python_build() -> None:
    rng = random.Random(0)
    batch = new_batch()
    free_blocks = list(range(10_000))
    rng.shuffle(free_blocks)
    running: dict[str, Request] = {}
    rows_seen: set[int] = set()
    num_added = 0
    for step in range(120):
        for _ in range(rng.randint(0, 3)):  # joins, past the initial number of rows
            request = Request(f"r{step}-{len(running)}", rng, free_blocks)
            running[request.request_id] = request
            num_added += 1
            rows_seen.add(batch.add_request(request.request_id, request.token_ids[:request.num_prompt], [],
                                            SamplingParams(temperature=0), None))
        for request_id in rng.sample(sorted(running), k=min(len(running), rng.randint(0, 2))):  # leaves
            batch.remove_request(request_id)
            free_blocks.extend(running.pop(request_id).block_ids)
        if running and rng.random() < 0.1:  # a preemption: the blocks come back different
            victim = running[rng.choice(sorted(running))]
            victim.preempt()
            batch.forget_blocks(victim.request_id)
        if not running:
            continue
        chosen = rng.sample(sorted(running), k=rng.randint(1, len(running)))  # any order, any subset
        seqs = sorted((running[request_id].schedule(rng) for request_id in chosen), key=lambda s: len(s.token_ids) != 1)
        assert batch_inputs(batch, seqs) == reference_inputs(seqs), f"step {step}"
    assert batch.num_reqs == len(running)
    assert max(rows_seen) >= INITIAL_NUM_ROWS  # the rows grew
    assert len(rows_seen) < num_added  # and rows were reused


def test_staging_and_block_table_grow(monkeypatch) -> None:
    monkeypatch.setattr(input_batch_module, "INITIAL_STAGING_SIZE", 8)
    monkeypatch.setattr(input_batch_module, "INITIAL_NUM_BLOCKS_PER_ROW", 1)
    batch = new_batch()
    batch.add_request("a", list(range(30)), [], SamplingParams(temperature=0), None)
    seq = ScheduledSequence("a", 0, list(range(30)), list(range(100, 108)), sample=True)
    assert batch_inputs(batch, [seq]) == reference_inputs([seq])


def test_a_changed_block_list_of_the_same_length_is_rewritten() -> None:
    batch = new_batch()
    batch.add_request("a", [1, 2, 3, 4, 5], [], SamplingParams(temperature=0), None)
    first = ScheduledSequence("a", 0, [1, 2, 3], [7, 8], sample=False)
    batch_inputs(batch, [first])
    moved = ScheduledSequence("a", 3, [4, 5], [9, 6], sample=True)  # no preemption notice: the last id differs
    assert batch_inputs(batch, [moved]) == reference_inputs([moved])


def dense_penalized(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """The former dense formula: [B, V + 1] counts rebuilt from the padded token lists."""
    def counts(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(row) for row in rows))
        ids = torch.tensor([row + [VOCAB] * (width - len(row)) for row in rows])
        return torch.zeros(len(rows), VOCAB + 1, dtype=torch.int64).scatter_add_(1, ids, torch.ones_like(ids))[:, :VOCAB]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).unsqueeze(1)

    output_counts = counts(outputs)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = (counts(prompts) > 0) | (output_counts > 0)
        penalty = column([p.repetition_penalty for p in params]).expand_as(logits)
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - column([p.frequency_penalty for p in params]) * output_counts
    return logits - column([p.presence_penalty for p in params]) * (output_counts > 0)


PENALTY_PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3),
                  SamplingParams(temperature=0, presence_penalty=0.7),
                  SamplingParams(temperature=0, frequency_penalty=0.4, presence_penalty=-0.2),
                  SamplingParams(temperature=0, repetition_penalty=0.8, frequency_penalty=0.25)]


def test_incremental_penalties_equal_dense_counts() -> None:
    rng = random.Random(1)
    batch = new_batch()
    sampler = Sampler()
    live: dict[str, tuple[SamplingParams, list[int], list[int]]] = {}
    for step in range(60):
        for _ in range(rng.randint(0, 2)):
            params = rng.choice(PENALTY_PARAMS)
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
            outputs = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))]  # e.g. a remote first token
            request_id = f"r{step}-{len(live)}"
            batch.add_request(request_id, prompt, list(outputs), params, None)
            live[request_id] = (params, prompt, outputs)
        for request_id in rng.sample(sorted(live), k=min(len(live), rng.randint(0, 1))):
            batch.remove_request(request_id)
            del live[request_id]
        if not live:
            continue
        chosen = rng.sample(sorted(live), k=rng.randint(1, len(live)))
        seqs = [ScheduledSequence(r, 0, [1], [0], sample=True) for r in chosen]
        inputs = batch.prepare_inputs(seqs)
        meta = batch.sampling_metadata(inputs)
        # Few distinct values, so that penalties flip the argmax often.
        logits = torch.randint(-3, 4, (len(chosen), VOCAB)).float() * 0.5
        states = [live[r] for r in chosen]
        expected = dense_penalized(logits, *map(list, zip(*states, strict=True)))
        if meta.penalties is None:
            assert all(p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                       for p, _, _ in states)
        else:
            assert torch.equal(sampler(logits.clone(), meta, overwrite_logits=True).sampled_token_ids,
                               expected.argmax(dim=-1))
            assert torch.equal(apply_penalties(logits, meta.penalties, in_place=False), expected)
        tokens = [rng.randrange(VOCAB) for _ in chosen]
        batch.append_sampled(inputs.sampled_row_ids, tokens)
        for (_, _, outputs), token in zip(states, tokens, strict=True):
            outputs.append(token)
    assert batch.penalty_counts.width > 1
