"""Requests and references shared by the disaggregated e2e tests: greedy completions over token-id
prompts, and the same prompts through an in-process LLM."""

from __future__ import annotations

import httpx
import torch

from k2ray.engine.llm import LLM
from k2ray.sampling_params import SamplingParams

MAX_TOKENS = 12
TIMEOUT_S = 120.0
VOCAB = 500  # ordinary tokens of the tiny vocabulary (768, specials at the top)


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def complete(base: str, model: str, token_ids: list[int]) -> dict:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        response = await client.post(f"{base}/v1/completions", json={
            "model": model, "prompt": token_ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def text(body: dict) -> str:
    return body["choices"][0]["text"]


def llm_texts(llm: LLM, prompts: list[list[int]]) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [output.outputs[0].text for output in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
