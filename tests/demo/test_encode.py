"""The training sequences are the server's prompts token for token, with the loss on generated tokens only."""

from pathlib import Path

import pytest

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.demo.conversations import client_messages, training_conversations
from k2ray.demo.encode import declared_tools, encode, generated_text
from k2ray.demo.tools import CONVERT_UNITS_TOOL, WEB_SEARCH_TOOL
from k2ray.serve.search.web_search_tools import openai_declared_tools

TINY = Path(__file__).resolve().parents[2] / "k2ray" / "assets" / "k2-tiny"


@pytest.fixture(scope="module")
def tokenizer():
    return K2Tokenizer.from_pretrained(TINY)


def test_declared_tools_match_the_servers():
    tools = [CONVERT_UNITS_TOOL, WEB_SEARCH_TOOL]
    assert declared_tools(tools) == openai_declared_tools(tools)
    assert declared_tools(None) is None


def test_sequences_are_the_servers_prompt_then_the_generation(tokenizer):
    jinja = ChatTemplate.from_checkpoint(TINY)
    builtin = ChatTemplate()
    for conv in training_conversations(60, seed=1):
        seq = encode(tokenizer, builtin, conv)
        last = len(conv.messages) - 1
        segments = jinja.render_segments(client_messages(conv.messages[:last]), tools=declared_tools(conv.tools))
        prompt = tokenizer.encode_segments(segments)
        target = tokenizer.encode(generated_text(conv.messages[last]))
        assert seq.token_ids == prompt + target
        assert all(seq.loss_mask[len(prompt):]) and len(seq.loss_mask) == len(seq.token_ids)


def test_loss_covers_only_assistant_turns(tokenizer):
    im_end = tokenizer.token_id("<|im_end|>")
    for conv in training_conversations(60, seed=2):
        seq = encode(tokenizer, ChatTemplate(), conv)
        text = tokenizer.decode([t for t, m in zip(seq.token_ids, seq.loss_mask, strict=False) if m])
        assert text.startswith("<think>") and text.endswith("<|im_end|>")
        assert "<|im_user|>" not in text and "## Return of" not in text
        # Each target span ends at an <|im_end|>: as many spans as masked <|im_end|> tokens.
        num_spans = sum(1 for i, m in enumerate(seq.loss_mask) if m and (i == 0 or not seq.loss_mask[i - 1]))
        assert num_spans == sum(1 for t, m in zip(seq.token_ids, seq.loss_mask, strict=False) if m and t == im_end)
