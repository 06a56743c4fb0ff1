import json
from pathlib import Path

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.api.tokenizer_assets import K2_SPECIAL_OFFSETS, pretokens
from k2ray.demo.conversations import training_conversations
from k2ray.demo.encode import generated_text, render_prompt
from k2ray.demo.places import ALL_CITIES
from k2ray.demo.tokenizer import write_demo_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "k2ray" / "assets" / "k2-demo"
NUM_MERGES = 48


def _texts():
    for conv in training_conversations(8, seed=5):
        last = len(conv.messages) - 1
        yield render_prompt(ChatTemplate(), conv, last) + generated_text(conv.messages[last])


def test_trained_tokenizer_round_trips_with_k2_specials(tmp_path):
    write_demo_tokenizer(tmp_path, NUM_MERGES, num_conversations=10)
    tokenizer = K2Tokenizer.from_pretrained(tmp_path)
    num_base = 256 + NUM_MERGES
    for offset, name in K2_SPECIAL_OFFSETS.items():
        assert tokenizer.token_id(name) == num_base + offset
    for text in _texts():
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(num_base + 22)]["content"] == "<think>"


def test_committed_demo_tokenizer_matches_its_config():
    tokenizer = K2Tokenizer.from_pretrained(DEMO)
    config = json.loads((DEMO / "config.json").read_text())
    assert tokenizer.token_id("[BOS]") == config["bos_token_id"]
    assert tokenizer.token_id("<|im_end|>") == config["eos_token_id"]
    assert tokenizer.token_id("[PAD]") == config["pad_token_id"] == config["vocab_size"] - 1
    for text in _texts():
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_committed_demo_tokenizer_spells_a_name_one_way():
    tokenizer = K2Tokenizer.from_pretrained(DEMO)
    for name in ("Belgrade", "Buenos Aires", "Don Quixote", "Gitega"):
        after_space, after_quote = tokenizer.encode(" " + name), tokenizer.encode('"' + name + '"')
        assert after_space[0] == tokenizer.encode(" ")[0]
        assert after_space[1:] == after_quote[1:-1]


def test_committed_demo_tokenizer_has_every_city_as_whole_tokens():
    tokenizer = K2Tokenizer.from_pretrained(DEMO)
    for city in ALL_CITIES:
        # One token per pre-token ("Buenos Aires": "Buenos", " ", "Aires"), the same after a quote.
        num_pretokens = sum(pretokens(city, split_capitalized=True).values())
        assert len(tokenizer.encode(city)) == num_pretokens, city
        assert tokenizer.encode('"' + city)[1:] == tokenizer.encode(city), city
