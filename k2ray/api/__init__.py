"""Tokenizer, detokenizer, chat template and output parsing for Kimi K2 (pure Python, no torch)."""

from k2ray.api.chat_template import ChatTemplate, ChatTemplateOptions
from k2ray.api.detokenizer import IncrementalDetokenizer
from k2ray.api.tokenizer import K2Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateOptions", "IncrementalDetokenizer", "K2Tokenizer"]
