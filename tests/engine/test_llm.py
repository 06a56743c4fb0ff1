"""LLM over the embedded k2-tiny checkpoint (tokenizer, INT4 experts): batching, seeds, n, stops, chat."""

from __future__ import annotations

import pytest
import torch
from conftest import load_model_test_helper, track_engine

from k2ray import LLM, SamplingParams
from k2ray.engine.scheduler import RequestRejected

hf_checkpoints = load_model_test_helper("hf_checkpoints")

PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def random_prompts(num: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 48, (num,), generator=gen).tolist()
    return [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=gen).tolist()} for n in lengths]


def test_alone_and_in_a_batch_of_32_give_the_same_greedy_tokens(llm: LLM) -> None:
    alone = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    prompts = random_prompts(31, seed=0)
    prompts.insert(13, PROMPT)
    outputs = llm.generate(prompts, GREEDY)
    assert [o.prompt for o in outputs][13] == PROMPT
    assert outputs[13].outputs[0].token_ids == alone
    singles = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts[:4]]
    assert [o.outputs[0].token_ids for o in outputs[:4]] == singles


def test_seeded_sampling_alone_and_in_a_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = llm.generate(PROMPT, seeded)[0].outputs[0].token_ids
    prompts = random_prompts(7, seed=1) + [PROMPT]
    params = [SamplingParams(temperature=0.8, max_tokens=16)] * 7 + [seeded]
    batch = llm.generate(prompts, params)
    assert batch[-1].outputs[0].token_ids == alone
    assert llm.generate(PROMPT, seeded)[0].outputs[0].token_ids == alone


def test_n_fans_out_with_seed_plus_index(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=10, max_tokens=8)
    (output,) = llm.generate(PROMPT, params)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    for i, completion in enumerate(output.outputs):
        single = SamplingParams(temperature=1.0, seed=10 + i, max_tokens=8)
        assert completion.token_ids == llm.generate(PROMPT, single)[0].outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_outputs_keep_input_order_and_report_cached_tokens(llm: LLM) -> None:
    long_prompt = {"prompt_token_ids": list(range(100, 140))}
    first, second = llm.generate([long_prompt, long_prompt], SamplingParams(temperature=0, max_tokens=2))
    again = llm.generate(long_prompt, SamplingParams(temperature=0, max_tokens=2))[0]
    assert first.prompt_token_ids == long_prompt["prompt_token_ids"]
    assert again.num_cached_tokens == 36  # 9 full blocks of 4; the last token is always computed
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == again.outputs[0].token_ids


def test_stop_string_truncates_text(llm: LLM) -> None:
    full = llm.generate(PROMPT, GREEDY)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    # A stop string made of the text of two consecutive plain output tokens past the first three.
    pieces = (tokenizer.decode(full.token_ids[i:i + 2]) for i in range(3, len(full.token_ids) - 1)
              if not any(tokenizer.is_special(t) for t in full.token_ids[i:i + 2]))
    piece = next(p for p in pieces if "\ufffd" not in p and full.text.find(p) > 0)
    index = full.text.find(piece)
    stopped = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, stop=[piece]))[0].outputs[0]
    assert stopped.text == full.text[:index]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == piece
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]
    # The stop string completes on the last allowed token: it still wins over "length".
    last = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=len(stopped.token_ids),
                                               stop=[piece]))[0].outputs[0]
    assert (last.text, last.finish_reason, last.stop_reason) == (stopped.text, "stop", piece)
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, stop=[piece],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[:index + len(piece)]


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    full = llm.generate(PROMPT, GREEDY)[0].outputs[0]
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]))[0]
    completion = out.outputs[0]
    assert completion.token_ids == full.token_ids[:first + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    assert completion.text == llm.get_tokenizer().decode(full.token_ids[:first], skip_special_tokens=True)
    short = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"


def test_logprobs_in_outputs(llm: LLM) -> None:
    completion = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0].outputs[0]
    assert len(completion.logprobs) == 4
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert entry[token_id].rank == 1
        assert len(entry) == 2
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)))


def test_chat_renders_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "hi"}]
    (output,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4),
                         chat_template_kwargs={"thinking": False})
    assert output.prompt.startswith("<|im_system|>") and output.prompt.endswith("<think></think>")
    assert output.prompt_token_ids == llm.get_tokenizer().encode(output.prompt)
    assert len(output.outputs[0].token_ids) == 4
    two = llm.chat([messages, messages], SamplingParams(temperature=0, max_tokens=4))
    assert len(two) == 2 and two[0].outputs[0].token_ids == two[1].outputs[0].token_ids


def test_rejects_too_long_prompts(llm: LLM) -> None:
    with pytest.raises(RequestRejected, match="max_model_len"):
        llm.generate([PROMPT, {"prompt_token_ids": [1] * 500}], SamplingParams(max_tokens=100))
    assert not llm.llm_engine.has_unfinished_requests()


def test_eos_ignore_eos_and_min_tokens(tmp_path) -> None:
    path = hf_checkpoints.make_hf_checkpoint(tmp_path, "k2_like", seed=4)
    probe = LLM(str(path), skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    track_engine(probe)
    prompt = {"prompt_token_ids": [3, 4, 5, 6, 7]}
    full = probe.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    tokens = full.outputs[0].token_ids
    eos = tokens[3]
    first = tokens.index(eos)
    llm = LLM(str(hf_checkpoints.make_hf_checkpoint(tmp_path / "eos", "k2_like", seed=4, eos_token_id=eos)),
              skip_tokenizer_init=True, block_size=4, num_kv_blocks=64)
    track_engine(llm)
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert stopped.token_ids == tokens[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    ignored = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"
    min_tokens = first + 2
    # eos counts only once min_tokens are out: the first eos at output length >= min_tokens stops.
    later = [i for i, t in enumerate(tokens) if t == eos and i + 1 >= min_tokens]
    expected = tokens[:later[0] + 1] if later else tokens
    at_least = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, min_tokens=min_tokens))[0]
    assert at_least.outputs[0].token_ids == expected
