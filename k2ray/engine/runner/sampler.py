from __future__ import annotations

from dataclasses import dataclass

import torch

from k2ray.engine.runner.penalty_counts import PenaltyCounts, PenaltyInputs, apply_penalties
from k2ray.sampling_params import SamplingParams

# Below this temperature a request is sampled greedily (dividing by it would overflow).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingMetadata:
    """Per-step sampling inputs for B rows. The random-sampling fields cover only the R rows sampled at a
    temperature, so greedy rows cost one argmax and an all-greedy batch nothing more (no sort, no noise);
    penalties are None when no row has one."""

    all_greedy: bool
    random_rows: torch.Tensor | None  # [R] int64 positions among the B rows; None when R == B or R == 0
    temperature: torch.Tensor | None  # [R] float32
    top_k: torch.Tensor | None  # [R] int64, vocab_size where off
    top_p: torch.Tensor | None  # [R] float32
    min_p: torch.Tensor | None  # [R] float32
    generators: dict[int, torch.Generator]  # random row (0..R-1) -> per-request generator (seeded requests)
    penalties: PenaltyInputs | None
    max_num_logprobs: int | None


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    sampled_logprobs: torch.Tensor | None = None  # [B]
    sampled_ranks: torch.Tensor | None = None  # [B], 1 = most likely
    top_token_ids: torch.Tensor | None = None  # [B, N]
    top_logprobs: torch.Tensor | None = None  # [B, N]


def has_penalty(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


def samples_greedily(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def random_sampling_metadata(params: list[SamplingParams], generators: list[torch.Generator | None],
                             vocab_size: int, device: torch.device) -> dict:
    """The random-row fields of SamplingMetadata for the rows `params` (those at a temperature)."""
    if not params:
        return {"temperature": None, "top_k": None, "top_p": None, "min_p": None, "generators": {}}

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    use_top_k = any(p.top_k is not None and p.top_k < vocab_size for p in params)
    return {
        "temperature": column([p.temperature for p in params], torch.float32),
        "top_k": column([min(p.top_k or vocab_size, vocab_size) for p in params], torch.int64) if use_top_k else None,
        "top_p": column([p.top_p for p in params], torch.float32) if any(p.top_p < 1.0 for p in params) else None,
        "min_p": column([p.min_p for p in params], torch.float32) if any(p.min_p > 0.0 for p in params) else None,
        "generators": {row: g for row, g in enumerate(generators) if g is not None},
    }


def build_sampling_metadata(params: list[SamplingParams], prompt_token_ids: list[list[int]],
                            output_token_ids: list[list[int]], generators: list[torch.Generator | None],
                            vocab_size: int, device: torch.device) -> SamplingMetadata:
    """Metadata for a one-off batch, from lists (the engine keeps its rows in an InputBatch instead)."""
    random_rows = [row for row, p in enumerate(params) if not samples_greedily(p)]
    penalties = None
    if any(has_penalty(p) for p in params):
        counts = PenaltyCounts(len(params), device)
        for row, p in enumerate(params):
            if has_penalty(p):
                counts.add_row(row, prompt_token_ids[row], output_token_ids[row], p.repetition_penalty != 1.0)
        penalties = penalty_inputs(params, counts.token_ids, counts.output_counts, counts.in_prompt, device)
    logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        all_greedy=not random_rows,
        random_rows=torch.tensor(random_rows, device=device) if 0 < len(random_rows) < len(params) else None,
        penalties=penalties, max_num_logprobs=max(logprob_counts) if logprob_counts else None,
        **random_sampling_metadata([params[r] for r in random_rows], [generators[r] for r in random_rows],
                                   vocab_size, device))


def penalty_inputs(params: list[SamplingParams], token_ids: torch.Tensor, output_counts: torch.Tensor,
                   in_prompt: torch.Tensor, device: torch.device) -> PenaltyInputs:
    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    return PenaltyInputs(column([p.presence_penalty for p in params]), column([p.frequency_penalty for p in params]),
                         column([p.repetition_penalty for p in params]) if use_rep else None,
                         token_ids, output_counts, in_prompt)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = logits_sort.gather(1, (logits.shape[1] - top_k).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    if top_p is not None:
        cumulative = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        cut = cumulative <= 1 - top_p.unsqueeze(1)
        cut[:, -1] = False  # always keep the most likely token
        logits_sort.masked_fill_(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _exponential_noise(probs: torch.Tensor, generators: dict[int, torch.Generator],
                       default_generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.empty_like(probs)
    noise.exponential_(generator=default_generator)
    # Seeded rows draw from their own generator, so their tokens do not depend on the batch.
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return noise


class Sampler:
    """Batched sampling: penalties -> greedy argmax; the rows at a temperature then go temperature -> min-p
    -> top-k/top-p -> exponential-race sampling (argmax of probs / Exp(1) noise, no host sync). Logprobs
    come from the raw logits."""

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata, *, overwrite_logits: bool = False) -> SamplerOutput:
        """`overwrite_logits`: the caller needs `logits` no more, so penalties may be applied in place."""
        raw_logits = logits
        if meta.penalties is not None:
            # Logprobs come from the raw logits: then they are kept.
            in_place = overwrite_logits and meta.max_num_logprobs is None
            logits = apply_penalties(logits, meta.penalties, in_place=in_place)
        sampled = logits.argmax(dim=-1)
        if not meta.all_greedy:
            if meta.random_rows is None:
                sampled = self._sample_random(logits, meta)
            else:
                sampled.index_copy_(0, meta.random_rows, self._sample_random(logits[meta.random_rows], meta))
        if meta.max_num_logprobs is None:
            return SamplerOutput(sampled)
        return self._with_logprobs(raw_logits, sampled, meta.max_num_logprobs)

    def _sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """logits [R, V] of the random rows -> their tokens [R]."""
        logits = logits / meta.temperature.unsqueeze(1)
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        return (probs / _exponential_noise(probs, meta.generators, self.default_generator)).argmax(dim=-1)

    @staticmethod
    def _with_logprobs(raw_logits: torch.Tensor, sampled: torch.Tensor, num_top: int) -> SamplerOutput:
        logprobs = raw_logits.float().log_softmax(dim=-1)
        sampled_logprobs = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > sampled_logprobs.unsqueeze(1)).sum(dim=-1) + 1
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)
        return SamplerOutput(sampled, sampled_logprobs, ranks, top_ids, top_logprobs)
