from __future__ import annotations

from dataclasses import dataclass

import torch

from k2ray.sampling_params import SamplingParams

# Below this temperature a request is sampled greedily (dividing by it would overflow).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingMetadata:
    """Per-step sampling inputs for B rows. Optional tensors are None when no row needs them, so
    an all-greedy batch costs one argmax."""

    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows
    is_greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab_size where off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    generators: dict[int, torch.Generator]  # row -> per-request generator (seeded requests)
    presence_penalty: torch.Tensor | None  # [B, 1]
    frequency_penalty: torch.Tensor | None  # [B, 1]
    repetition_penalty: torch.Tensor | None  # [B, 1]
    prompt_token_ids: torch.Tensor | None  # [B, P] padded with vocab_size
    output_token_ids: torch.Tensor | None  # [B, O] padded with vocab_size
    max_num_logprobs: int | None


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    sampled_logprobs: torch.Tensor | None = None  # [B]
    sampled_ranks: torch.Tensor | None = None  # [B], 1 = most likely
    top_token_ids: torch.Tensor | None = None  # [B, N]
    top_logprobs: torch.Tensor | None = None  # [B, N]


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(row) for row in rows))
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.int64, device=device)


def build_sampling_metadata(params: list[SamplingParams], prompt_token_ids: list[list[int]],
                            output_token_ids: list[list[int]], generators: list[torch.Generator | None],
                            vocab_size: int, device: torch.device) -> SamplingMetadata:
    greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
    random_rows = [p for p, g in zip(params, greedy, strict=True) if not g]
    use_top_k = any(p.top_k is not None and p.top_k < vocab_size for p in random_rows)
    use_top_p = any(p.top_p < 1.0 for p in random_rows)
    use_min_p = any(p.min_p > 0.0 for p in random_rows)
    use_penalty = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params)
    use_rep = any(p.repetition_penalty != 1.0 for p in params)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        temperature=torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                                 dtype=torch.float32, device=device),
        is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        all_greedy=all(greedy),
        top_k=torch.tensor([min(p.top_k or vocab_size, vocab_size) for p in params], device=device)
        if use_top_k else None,
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device) if use_top_p else None,
        min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device) if use_min_p else None,
        generators={row: g for row, g in enumerate(generators) if g is not None and not greedy[row]},
        presence_penalty=column([p.presence_penalty for p in params]) if use_penalty else None,
        frequency_penalty=column([p.frequency_penalty for p in params]) if use_penalty else None,
        repetition_penalty=column([p.repetition_penalty for p in params]) if use_penalty else None,
        prompt_token_ids=_padded(prompt_token_ids, vocab_size, device) if use_rep else None,
        output_token_ids=_padded(output_token_ids, vocab_size, device) if use_penalty else None,
        max_num_logprobs=max(logprob_counts) if logprob_counts else None,
    )


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int64, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]  # the last column collected the padding


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """vLLM semantics: repetition over prompt + output tokens, presence/frequency over outputs."""
    vocab_size = logits.shape[1]
    output_counts = _token_counts(meta.output_token_ids, vocab_size)
    if meta.prompt_token_ids is not None:
        seen = (_token_counts(meta.prompt_token_ids, vocab_size) > 0) | (output_counts > 0)
        penalty = meta.repetition_penalty.expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalty * output_counts
    return logits - meta.presence_penalty * (output_counts > 0)


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
    """Batched sampling: penalties -> temperature -> min-p -> top-k/top-p -> exponential-race
    sampling (argmax of probs / Exp(1) noise, no host sync). Logprobs come from the raw logits."""

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw_logits = logits
        if meta.output_token_ids is not None:
            logits = apply_penalties(logits, meta)
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy_ids
        else:
            sampled = torch.where(meta.is_greedy, greedy_ids, self._sample_random(logits, meta))
        if meta.max_num_logprobs is None:
            return SamplerOutput(sampled)
        return self._with_logprobs(raw_logits, sampled, meta.max_num_logprobs)

    def _sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
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
