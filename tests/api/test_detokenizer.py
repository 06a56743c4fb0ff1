from __future__ import annotations

import random
from pathlib import Path

import pytest

from k2ray.api import tokenizer as tokenizer_module
from k2ray.api.detokenizer import IncrementalDetokenizer
from k2ray.api.tokenizer import K2Tokenizer

TINY_DIR = Path(tokenizer_module.__file__).resolve().parents[1] / "assets" / "k2-tiny"
MULTIBYTE = "你好，世界！今天的天气很好。😀🎉 café 👩‍👩‍👧 Ünïcödé"


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(TINY_DIR)


def _is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_split_characters_never_yield_replacement(tok: K2Tokenizer) -> None:
    ids = tok.encode(MULTIBYTE)
    # The test is only meaningful if some tokens really end inside a character.
    assert any(not _is_valid_utf8(tok.token_bytes(i)) for i in ids)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE == detok.text
    assert detok.flush() == ""
    assert detok.token_ids == ids


def test_deltas_are_whole_characters(tok: K2Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("😀")
    assert len(ids) > 1
    assert [detok.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_special_tokens_kept_or_skipped(tok: K2Tokenizer) -> None:
    text = "<think>思考</think>答案<|im_end|>"
    ids = tok.encode(text)
    kept = IncrementalDetokenizer(tok)
    assert "".join(kept.push([i]) for i in ids) == text
    skipped = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert "".join(skipped.push([i]) for i in ids) == "思考答案"


def test_incomplete_tail_flushes_as_replacement(tok: K2Tokenizer) -> None:
    ids = tok.encode("好")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1]) == "\ufffd"


@pytest.mark.parametrize("skip", [False, True])
def test_matches_batch_decode_on_random_ids(tok: K2Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        pos, deltas = 0, []
        while pos < len(ids):
            step = rng.randrange(1, 4)
            deltas.append(detok.push(ids[pos : pos + step]))
            pos += step
        deltas.append(detok.flush())
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
