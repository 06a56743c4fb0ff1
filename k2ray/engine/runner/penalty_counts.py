"""Sparse per-request token counts for the presence / frequency / repetition penalties.

Each row (a request's row of the persistent input batch) lists the distinct tokens it has seen: `token_ids`
[R, W], their count among the outputs `output_counts` [R, W] and whether the prompt holds them `in_prompt`
[R, W]. A step gathers the logits at those W columns, penalises them and scatters them back, so its cost grows
with the tokens a request has seen, not with the vocabulary, and nothing is rebuilt per step: a sampled token
bumps one count or fills one slot.

Invariant: the slots past a row's entries repeat its first entry (a row without entries holds the neutral
entry: token 0, never seen), so every slot can be penalised and scattered unmasked; duplicate columns of a
row get identical values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Distinct tokens per row the buffers start with; they double when a row needs more.
INITIAL_PENALTY_WIDTH = 64


@dataclass(frozen=True, slots=True)
class PenaltyInputs:
    """One step's penalty inputs for B sampled rows (vLLM semantics: repetition over prompt + output tokens,
    presence / frequency over output tokens)."""

    presence_penalty: torch.Tensor  # [B, 1] float32
    frequency_penalty: torch.Tensor  # [B, 1] float32
    repetition_penalty: torch.Tensor | None  # [B, 1] float32, None when no row has one
    token_ids: torch.Tensor  # [B, W] int64
    output_counts: torch.Tensor  # [B, W] int64
    in_prompt: torch.Tensor  # [B, W] bool


def distinct_token_counts(prompt_token_ids: list[int], output_token_ids: list[int],
                          track_prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct token ids [n], their output counts [n], in the prompt [n]) of one request, on the host."""
    prompt = torch.tensor(prompt_token_ids if track_prompt else [], dtype=torch.int64)
    output = torch.tensor(output_token_ids, dtype=torch.int64)
    token_ids, inverse = torch.unique(torch.cat([prompt, output]), return_inverse=True)
    counts = torch.zeros(token_ids.numel(), dtype=torch.int64).index_add_(
        0, inverse[prompt.numel():], torch.ones(output.numel(), dtype=torch.int64))
    in_prompt = torch.zeros(token_ids.numel(), dtype=torch.bool)
    in_prompt[inverse[:prompt.numel()]] = True
    return token_ids, counts, in_prompt


class PenaltyCounts:
    """The sparse counts of every row of a persistent batch, on `device`. Rows not added hold no entries."""

    def __init__(self, num_rows: int, device: torch.device, width: int = INITIAL_PENALTY_WIDTH) -> None:
        self.device = device
        self.token_ids = torch.zeros(num_rows, width, dtype=torch.int64, device=device)
        self.output_counts = torch.zeros(num_rows, width, dtype=torch.int64, device=device)
        self.in_prompt = torch.zeros(num_rows, width, dtype=torch.bool, device=device)
        self._slots: list[dict[int, int]] = [{} for _ in range(num_rows)]  # per row: token id -> slot

    @property
    def width(self) -> int:
        return self.token_ids.shape[1]

    def grow_rows(self, num_rows: int) -> None:
        extra = num_rows - self.token_ids.shape[0]
        self.token_ids = torch.cat([self.token_ids, self.token_ids.new_zeros(extra, self.width)])
        self.output_counts = torch.cat([self.output_counts, self.output_counts.new_zeros(extra, self.width)])
        self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(extra, self.width)])
        self._slots.extend({} for _ in range(extra))

    def add_row(self, row: int, prompt_token_ids: list[int], output_token_ids: list[int],
                track_prompt: bool) -> None:
        token_ids, counts, in_prompt = distinct_token_counts(prompt_token_ids, output_token_ids, track_prompt)
        self._ensure_width(token_ids.numel())
        self._slots[row] = {token: slot for slot, token in enumerate(token_ids.tolist())}
        self._write_row(row, token_ids, counts, in_prompt)

    def remove_row(self, row: int) -> None:
        if self._slots[row]:
            self._slots[row] = {}
            self.token_ids[row] = 0
            self.output_counts[row] = 0
            self.in_prompt[row] = False

    def append_tokens(self, rows: list[int], token_ids: list[int]) -> None:
        """Count one new output token per row (rows distinct, each added before)."""
        seen_rows, seen_tokens, new_rows, new_slots, new_tokens = [], [], [], [], []
        for row, token in zip(rows, token_ids, strict=True):
            slots = self._slots[row]
            if token in slots:
                seen_rows.append(row)
                seen_tokens.append(token)
            elif slots:
                new_rows.append(row)
                new_slots.append(len(slots))
                new_tokens.append(token)
                slots[token] = len(slots)
            else:  # the row's first entry fills every slot (the invariant)
                slots[token] = 0
                one = torch.ones(1, dtype=torch.int64)
                self._write_row(row, torch.tensor([token]), one, torch.zeros(1, dtype=torch.bool))
        if seen_rows:
            index = torch.tensor(seen_rows, device=self.device)
            matches = self.token_ids[index] == torch.tensor(seen_tokens, device=self.device).unsqueeze(1)
            self.output_counts[index] += matches  # the entry and its copies alike
        if new_rows:
            self._ensure_width(max(new_slots) + 1)
            index = (torch.tensor(new_rows, device=self.device), torch.tensor(new_slots, device=self.device))
            self.token_ids[index] = torch.tensor(new_tokens, device=self.device)
            self.output_counts[index] = 1
            self.in_prompt[index] = False

    def _write_row(self, row: int, token_ids: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor) -> None:
        n = token_ids.numel()
        if n == 0:
            return
        for buffer, values in ((self.token_ids, token_ids), (self.output_counts, counts),
                               (self.in_prompt, in_prompt)):
            values = values.to(self.device)
            buffer[row, :n] = values
            buffer[row, n:] = values[0]

    def _ensure_width(self, width: int) -> None:
        if width <= self.width:
            return
        extra = max(width, 2 * self.width) - self.width
        # New slots repeat each row's first entry (the invariant).
        self.token_ids = torch.cat([self.token_ids, self.token_ids[:, :1].expand(-1, extra)], dim=1)
        self.output_counts = torch.cat([self.output_counts, self.output_counts[:, :1].expand(-1, extra)], dim=1)
        self.in_prompt = torch.cat([self.in_prompt, self.in_prompt[:, :1].expand(-1, extra)], dim=1)


def apply_penalties(logits: torch.Tensor, penalties: PenaltyInputs, in_place: bool) -> torch.Tensor:
    """The dense formula's elementwise steps, in its order, on the W gathered columns of each row (bit for bit
    what a [B, V] count tensor would give); `in_place` writes into `logits`."""
    values = logits.gather(1, penalties.token_ids)
    counts = penalties.output_counts
    if penalties.repetition_penalty is not None:
        seen = penalties.in_prompt | (counts > 0)
        penalty = penalties.repetition_penalty.expand_as(values)
        values = torch.where(seen, torch.where(values > 0, values / penalty, values * penalty), values)
    values = values - penalties.frequency_penalty * counts
    values = values - penalties.presence_penalty * (counts > 0)
    return (logits.scatter_ if in_place else logits.scatter)(1, penalties.token_ids, values)
