"""Generates the tiny checkpoint's tokenizer files (`python -m k2ray.api.tokenizer_assets [DIR]`).

A byte-level BPE with 256 merges trained deterministically on an embedded text sample, and K2's 256
special slots after it (named ones at their K2 offsets). chat_template.jinja is a hand-written asset.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections import Counter
from pathlib import Path

import regex

from k2ray.api.tokenizer import (
    CONFIG_FILE,
    K2_PAT_STR,
    NUM_RESERVED_SPECIAL_TOKENS,
    VOCAB_FILE,
    reserved_token_name,
)

NUM_BYTE_TOKENS = 256
NUM_MERGES = 256
TINY_MODEL_MAX_LENGTH = 262144

# Named K2 specials by offset from the first special id (163584 in K2), from K2's tokenizer_config.json.
K2_SPECIAL_OFFSETS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    18: "<|media_begin|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    22: "<think>",
    23: "</think>",
    254: "[UNK]",
    255: "[PAD]",
}
ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
)

# Training text: English, chat-template words, Python code and Chinese, so that the tiny vocab covers
# what the demo model sees most. Changing it changes every token id of the tiny checkpoint.
TRAINING_SAMPLE = """\
You are Kimi, an AI assistant created by Moonshot AI. The user asks a question and the assistant answers.
system user assistant tool tool_declare functions.get_weather:0 ## Return of functions.search:1
Kimi K2 Thinking is a mixture-of-experts language model with one trillion parameters, of which thirty-two
billion are active for each token. It reasons step by step before it answers, and it can call tools while
it thinks: search the web, run code, read files, and then continue the reasoning with the results.
The weather in Beijing is sunny today, with a high of 25 degrees and a low of 12 degrees. Tomorrow it will
rain in Shanghai, so take an umbrella. What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea. The sea is wide and blue; the waves come in and go out again.
Hello, world! How are you doing today? I am fine, thank you. Let me think about this problem carefully.
First, we need to find the number of tokens in the prompt. Then we compute the attention for each layer.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
In 2025 the model was released with open weights under a modified MIT license, and people served it with
vLLM, SGLang and other engines on clusters of GPUs with expert parallelism and prefix caching.
{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
{"city": "Beijing", "unit": "celsius"} {"weather": "Sunny", "temperature": 25} {"query": "latest news"}

def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


for i in range(10):
    print(f"{i}: {fibonacci(i)}")

import json
with open("data.json", encoding="utf-8") as f:
    data = json.load(f)
result = [item["name"] for item in data if item.get("active")]

function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2);
SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name ORDER BY name;

你好，我是月之暗面科技有限公司开发的人工智能助手 Kimi。我会认真思考用户的问题，然后给出准确、有帮助的回答。
今天北京的天气晴朗，最高气温二十五度。明天上海有雨，出门请带伞。中国的首都是北京，法国的首都是巴黎。
请写一首关于大海的短诗。大海宽广而蔚蓝，海浪来了又去。我们需要先计算提示中的词元数量，然后逐层计算注意力。
这个模型是一个混合专家语言模型，总参数一万亿，每个词元激活三百二十亿参数。它可以在思考的过程中调用工具。
"""


def pretokens(text: str, split_capitalized: bool = False) -> Counter[tuple[int, ...]]:
    words: Counter[tuple[int, ...]] = Counter()
    for word in regex.findall(K2_PAT_STR, text, flags=regex.V1):
        if split_capitalized and len(word) > 1 and not word[0].isalnum() and word[1].isupper():
            # Trained apart, " Kabul" and '"Kabul' end as the prefix byte then the same "Kabul" tokens: no
            # merge spans the boundary, so encoding (which only applies learnt merges) splits there too.
            words[tuple(word[0].encode("utf-8"))] += 1
            word = word[1:]
        words[tuple(word.encode("utf-8"))] += 1
    return words


def _merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    merged: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def train_bpe(text: str, num_merges: int = NUM_MERGES, split_capitalized: bool = False,
              whole_words: str = "") -> dict[bytes, int]:
    """Byte-level BPE: tokens 0..255 are the single bytes, then one token per merge in merge order.

    Deterministic: the most frequent adjacent pair wins, ties go to the lowest (left id, right id).
    split_capitalized: no merge joins a space or punctuation byte to a capital letter after it, so a name
    has the same tokens wherever it stands (after a space in a sentence, after a quote in JSON arguments).
    whole_words: text whose pre-tokens each end as one token (counted above every pair of `text`, so their
    merges come first); `num_merges` must leave room for them.
    """
    vocab = [bytes([b]) for b in range(NUM_BYTE_TOKENS)]
    words = pretokens(text, split_capitalized)
    boost = 1 + sum(count * len(word) for word, count in words.items())  # above any pair count of `text`
    for word in pretokens(whole_words, split_capitalized):
        words[word] += boost
    seen = set(vocab)
    while len(vocab) < NUM_BYTE_TOKENS + num_merges:
        pairs: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            raise ValueError("training text too small for the requested number of merges")
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        token = vocab[pair[0]] + vocab[pair[1]]
        new_id = len(vocab)
        if token not in seen:
            vocab.append(token)
            seen.add(token)
        else:
            # Same bytes reached by another split: reuse the existing token, no new rank.
            new_id = vocab.index(token)
        words = Counter({_merge_word(w, pair, new_id): c for w, c in words.items()})
    return {token: rank for rank, token in enumerate(vocab)}


def tokenizer_config(num_base_tokens: int) -> dict:
    """HF-style tokenizer_config.json with K2's special layout after `num_base_tokens` base tokens."""
    decoder = {}
    for offset in range(NUM_RESERVED_SPECIAL_TOKENS):
        token_id = num_base_tokens + offset
        decoder[str(token_id)] = {
            "content": K2_SPECIAL_OFFSETS.get(offset, reserved_token_name(token_id)),
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": TINY_MODEL_MAX_LENGTH,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def write_tokenizer_files(out_dir: str | Path, text: str = TRAINING_SAMPLE, num_merges: int = NUM_MERGES,
                          split_capitalized: bool = False, whole_words: str = "") -> None:
    """tiktoken.model (a BPE trained on `text`) + tokenizer_config.json with K2's specials after it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe(text, num_merges, split_capitalized, whole_words)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in ranks.items()]
    (out_dir / VOCAB_FILE).write_text("\n".join(lines) + "\n", encoding="ascii")
    config = json.dumps(tokenizer_config(len(ranks)), indent=2, ensure_ascii=False)
    (out_dir / CONFIG_FILE).write_text(config + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", nargs="?", default=str(Path(__file__).parents[1] / "assets" / "k2-tiny"))
    write_tokenizer_files(parser.parse_args().out_dir)


if __name__ == "__main__":
    main()
