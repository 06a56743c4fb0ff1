from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from k2ray.api import tokenizer as tokenizer_module
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.api.tokenizer_assets import train_bpe, write_tokenizer_files

TINY_DIR = Path(tokenizer_module.__file__).resolve().parents[1] / "assets" / "k2-tiny"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "今天北京的天气晴朗，最高气温二十五度。",
    "emoji 😀🎉👩‍👩‍👧 and accents: café, naïve, Ünïcödé",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x:\r\n        pass\n",
    "mixed 混合 text with numbers 1234567 and symbols <>{}[]()",
    "",
    "   leading and trailing spaces   \n\n",
]


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.from_pretrained(TINY_DIR)


def test_special_ids_come_from_files(tok: K2Tokenizer) -> None:
    assert (tok.num_base_tokens, tok.vocab_size) == (512, 768)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (512, 513, 767, 766)
    assert tok.stop_token_ids == (514, 513)
    expected = {"<|im_end|>": 514, "<|im_user|>": 515, "<|im_assistant|>": 516, "<|im_system|>": 522,
                "<|tool_calls_section_begin|>": 523, "<|tool_calls_section_end|>": 524,
                "<|tool_call_begin|>": 525, "<|tool_call_argument_begin|>": 526, "<|tool_call_end|>": 527,
                "<|im_middle|>": 529, "<think>": 534, "</think>": 535, "<|reserved_token_517|>": 517}
    assert {k: tok.token_id(k) for k in expected} == expected
    assert len(tok.special_token_ids) == 256
    assert tok.is_special(512) and tok.is_special(767) and not tok.is_special(511)
    assert tok.token_bytes(534) == b"<think>"


def test_vocab_file_is_byte_level_bpe(tok: K2Tokenizer) -> None:
    lines = (TINY_DIR / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 512
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines)}
    assert sorted(ranks.values()) == list(range(512))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert tok.token_bytes(65) == b"A"


def test_tokenizer_config_is_hf_style() -> None:
    config = json.loads((TINY_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TikTokenTokenizer"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "[BOS]", "[EOS]", "[PAD]", "[UNK]")
    assert sorted(map(int, config["added_tokens_decoder"])) == list(range(512, 768))
    assert config["added_tokens_decoder"]["523"]["content"] == "<|tool_calls_section_begin|>"
    assert config["model_max_length"] > 0


def test_generator_is_deterministic(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY_DIR / name).read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: K2Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_bpe_merges_compress_training_like_text(tok: K2Tokenizer) -> None:
    text = "You are Kimi, an AI assistant created by Moonshot AI."
    assert len(tok.encode(text)) < len(text.encode()) * 2 // 3


def test_special_tokens_in_text(tok: K2Tokenizer) -> None:
    text = "<|im_user|>user<|im_middle|>hi<think>x</think><|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 515 and ids[-1] == 514 and 534 in ids and 535 in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "userhix"
    plain = tok.encode(text, allow_special_tokens=False)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text


def test_long_inputs_are_chunked(tok: K2Tokenizer) -> None:
    text = "x" * 60_000 + " " * 30_000 + "Hello world. 你好 " * 30_000
    assert len(text) > tokenizer_module.MAX_ENCODE_CHARS
    assert tok.decode(tok.encode(text)) == text


def _k2_reference_split(s: str, max_len: int) -> list[str]:
    # tokenization_kimi.py's per-character loop, the behaviour _split_long_runs must reproduce.
    out, run_len, is_space, start = [], 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        if is_space ^ ch.isspace():
            run_len, is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_len:
                out.append(s[start:i])
                start, run_len = i, 1
    out.append(s[start:])
    return out


def test_run_splitting_matches_k2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_module, "MAX_RUN_CHARS", 3)
    rng = random.Random(0)
    alphabet = "ab \n\t\u3000\x1c你"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        assert tokenizer_module._split_long_runs(s) == _k2_reference_split(s, 3)


def test_loads_real_k2_layout(tmp_path: Path) -> None:
    num_base = 163584
    singles = [base64.b64encode(bytes([b])).decode() for b in range(256)]
    multi = [base64.b64encode(f"t{i}".encode()).decode() for i in range(256, num_base)]
    (tmp_path / "tiktoken.model").write_text("\n".join(f"{t} {r}" for r, t in enumerate(singles + multi)) + "\n")
    named = {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163594: "<|im_system|>",
             163595: "<|tool_calls_section_begin|>", 163601: "<|im_middle|>", 163606: "<think>",
             163607: "</think>", 163838: "[UNK]", 163839: "[PAD]"}
    config = {"added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in named.items()},
              "bos_token": {"content": "[BOS]", "special": True}, "eos_token": "[EOS]",
              "pad_token": "[PAD]", "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = K2Tokenizer.from_pretrained(tmp_path)
    assert (tok.num_base_tokens, tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (163584, 163840, 163584, 163585)
    assert tok.stop_token_ids == (163586, 163585)
    assert (tok.pad_token_id, tok.unk_token_id) == (163839, 163838)
    assert tok.token_id("<|reserved_token_163589|>") == 163589
    ids = tok.encode("<|im_system|>hi<|im_middle|><think></think>")
    assert ids == [163594, ord("h"), ord("i"), 163601, 163606, 163607]
    assert tok.decode(ids) == "<|im_system|>hi<|im_middle|><think></think>"


def test_trainer_is_deterministic_and_byte_level() -> None:
    ranks = train_bpe("aaab aaab abab 你好你好", num_merges=4)
    assert ranks == train_bpe("aaab aaab abab 你好你好", num_merges=4)
    assert len(ranks) == 260 and all(ranks[bytes([b])] == b for b in range(256))


def test_split_capitalized_keeps_prefix_bytes_off_names():
    text = 'in Kabul, {"city": "Kabul"} Kabul and kabul in Kabul'
    plain, split = train_bpe(text, num_merges=12), train_bpe(text, num_merges=12, split_capitalized=True)
    assert b" Kabul" in plain
    assert b"Kabul" in split and not any(t[:1] in b' "' and t[1:2].isupper() for t in split)
    assert b" kabul" in train_bpe(text + " kabul", num_merges=12, split_capitalized=True)  # lowercase keeps it


def test_whole_words_end_as_single_tokens():
    text = "the weather in the city is fine, the city is big " * 20
    ranks = train_bpe(text, num_merges=20, split_capitalized=True, whole_words="Ouagadougou Reykjavik")
    assert b"Ouagadougou" in ranks and b"Reykjavik" in ranks
    assert b"Ouagadougou" not in train_bpe(text, num_merges=20, split_capitalized=True)
