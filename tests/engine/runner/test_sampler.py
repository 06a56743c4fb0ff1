from __future__ import annotations

import math

import pytest
import torch

from k2ray.engine.runner.sampler import Sampler, build_sampling_metadata
from k2ray.sampling_params import SamplingParams

VOCAB = 8


def run(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]] | None = None,
        prompts: list[list[int]] | None = None, seeds: list[int | None] | None = None, default_seed: int = 0):
    rows = len(params)
    generators = [None if s is None else torch.Generator().manual_seed(s) for s in (seeds or [None] * rows)]
    meta = build_sampling_metadata(params, prompts or [[0]] * rows, outputs or [[]] * rows, generators,
                                   VOCAB, torch.device("cpu"))
    return Sampler(torch.Generator().manual_seed(default_seed))(logits, meta)


def histogram(logits: torch.Tensor, params: SamplingParams, draws: int = 2000) -> torch.Tensor:
    out = run(logits.expand(draws, -1), [params] * draws)
    return torch.bincount(out.sampled_token_ids, minlength=VOCAB)


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, 3.0]])


def test_greedy_is_argmax() -> None:
    out = run(torch.tensor([[0.1, 5.0, 0.2] + [0.0] * 5, [9.0] + [0.0] * 7]), [SamplingParams(temperature=0)] * 2)
    assert out.sampled_token_ids.tolist() == [1, 0]


def test_top_k_limits_support() -> None:
    counts = histogram(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 7}


def test_top_p_limits_support() -> None:
    probs = LOGITS.softmax(-1)[0]
    # Tokens 7 and 0 hold ~0.87 of the mass; top_p 0.8 keeps exactly them.
    assert probs[7] + probs[0] > 0.8 > probs[7]
    counts = histogram(LOGITS, SamplingParams(temperature=1.0, top_p=0.8))
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 7}


def test_min_p_limits_support() -> None:
    probs = LOGITS.softmax(-1)[0]
    min_p = 0.3  # keeps tokens with prob >= 0.3 * max: 7 (max) and 0 (e^-1 ~ 0.37)
    counts = histogram(LOGITS, SamplingParams(temperature=1.0, min_p=min_p))
    kept = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    assert kept == {0, 7}
    assert set(torch.nonzero(counts).flatten().tolist()) == kept


def test_temperature_sharpens_and_flattens() -> None:
    cold = histogram(LOGITS, SamplingParams(temperature=0.05))
    assert cold[7] == cold.sum()
    hot = histogram(LOGITS, SamplingParams(temperature=5.0))
    assert (hot > 0).sum() == VOCAB


def test_sampling_follows_softmax() -> None:
    counts = histogram(LOGITS, SamplingParams(temperature=1.0), draws=20000).float()
    expected = LOGITS.softmax(-1)[0]
    assert torch.allclose(counts / counts.sum(), expected, atol=0.02)


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    alone = [run(LOGITS, [params], seeds=[7]).sampled_token_ids.item() for _ in range(3)]
    batch_logits = torch.cat([torch.randn(3, VOCAB), LOGITS, torch.randn(2, VOCAB)])
    batch_params = [SamplingParams(temperature=1.0)] * 3 + [params] + [SamplingParams(temperature=0.7)] * 2
    in_batch = run(batch_logits, batch_params, seeds=[None, None, None, 7, None, None], default_seed=99)
    assert alone[0] == alone[1] == alone[2] == in_batch.sampled_token_ids[3].item()


def test_repetition_penalty_over_prompt_and_output() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.9, 1.8, 0, 0, 0, 0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    # token 0 (positive) is divided, token 1 (negative) multiplied; token 0 is in the prompt.
    assert run(logits, [params], prompts=[[0]]).sampled_token_ids.item() == 2
    assert run(logits, [params], prompts=[[5]], outputs=[[2]]).sampled_token_ids.item() == 0
    assert run(logits, [params], prompts=[[0, 2]]).sampled_token_ids.item() == 3


def test_presence_and_frequency_penalties_over_outputs_only() -> None:
    logits = torch.tensor([[2.0, 1.5, 0, 0, 0, 0, 0, 0]])
    presence = SamplingParams(temperature=0, presence_penalty=0.6)
    assert run(logits, [presence], outputs=[[0]]).sampled_token_ids.item() == 1
    assert run(logits, [presence], prompts=[[0, 0, 0]]).sampled_token_ids.item() == 0
    frequency = SamplingParams(temperature=0, frequency_penalty=0.3)
    assert run(logits, [frequency], outputs=[[0]]).sampled_token_ids.item() == 0  # 2.0 - 0.3 > 1.5
    assert run(logits, [frequency], outputs=[[0, 0]]).sampled_token_ids.item() == 1  # 2.0 - 0.6 < 1.5


def test_logprobs_are_raw_log_softmax_with_rank_and_top_n() -> None:
    params = SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5)
    out = run(LOGITS, [params], prompts=[[7]])
    expected = LOGITS.log_softmax(-1)[0]
    token = out.sampled_token_ids.item()
    assert token == 0  # the penalty on 7 changes the choice, not the reported logprobs
    assert math.isclose(out.sampled_logprobs.item(), expected[0].item(), rel_tol=1e-6)
    assert out.sampled_ranks.item() == 2
    assert out.top_token_ids[0].tolist() == [7, 0, 1]
    assert torch.allclose(out.top_logprobs[0], expected[[7, 0, 1]])


def test_mixed_greedy_and_random_rows() -> None:
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)]
    out = run(torch.cat([LOGITS, LOGITS]), params)
    assert out.sampled_token_ids.tolist() == [7, 7]


@pytest.mark.parametrize("top_k", [1, VOCAB, 100])
def test_top_k_bounds(top_k: int) -> None:
    out = run(LOGITS, [SamplingParams(temperature=1.0, top_k=top_k, seed=1)], seeds=[1])
    assert 0 <= out.sampled_token_ids.item() < VOCAB


def test_all_greedy_batch_takes_only_an_argmax(monkeypatch) -> None:
    import k2ray.engine.runner.sampler as sampler_module

    def no_call(*_args, **_kwargs):
        raise AssertionError("an all-greedy batch must not sort or draw noise")

    monkeypatch.setattr(sampler_module, "apply_top_k_top_p", no_call)
    monkeypatch.setattr(sampler_module, "_exponential_noise", no_call)
    logits = torch.randn(5, VOCAB)
    out = run(logits, [SamplingParams(temperature=0, top_k=2, top_p=0.5)] * 5)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_random_rows_among_greedy_ones_sample_as_a_random_only_batch() -> None:
    seeded = [SamplingParams(temperature=0.9, top_k=4, top_p=0.9, seed=s) for s in (3, 4)]
    random_logits = torch.randn(2, VOCAB)
    alone = run(random_logits, seeded, seeds=[3, 4]).sampled_token_ids
    greedy_logits = torch.randn(3, VOCAB)
    mixed_logits = torch.cat([greedy_logits[:1], random_logits[:1], greedy_logits[1:], random_logits[1:]])
    greedy = SamplingParams(temperature=0)
    mixed = run(mixed_logits, [greedy, seeded[0], greedy, greedy, seeded[1]], seeds=[None, 3, None, None, 4])
    assert mixed.sampled_token_ids[[1, 4]].tolist() == alone.tolist()  # sampled by the sort path
    assert mixed.sampled_token_ids[[0, 2, 3]].tolist() == greedy_logits.argmax(dim=-1).tolist()
