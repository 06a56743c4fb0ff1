"""The demo model's tokenizer: K2's byte-level BPE layout (k2ray.api.tokenizer_assets) trained on the demo's
own conversations, so that tool declarations, tool results and answers take few tokens. Capitalised words keep
their leading space or quote apart (train_bpe's split_capitalized): a city or a title is then the same tokens
in the user's sentence, the reasoning, the JSON arguments and the tool result, and the model copies it token
for token. Every city of places.ALL_CITIES is a whole token (train_bpe's whole_words): a model this small
copies one token from the question into the call far more reliably than a name's 3 to 11 pieces."""

from __future__ import annotations

import re
from pathlib import Path

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.tokenizer_assets import K2_SPECIAL_OFFSETS, TRAINING_SAMPLE, write_tokenizer_files

from .conversations import training_conversations
from .encode import generated_text, render_prompt
from .places import ALL_CITIES

NUM_MERGES = 4096
NUM_CORPUS_CONVERSATIONS = 1500
CORPUS_SEED = 1_000_003  # distinct from the training data seed; any fixed value works
_SPECIALS = re.compile("|".join(re.escape(name) for name in K2_SPECIAL_OFFSETS.values()))


def corpus_text(num_conversations: int = NUM_CORPUS_CONVERSATIONS, seed: int = CORPUS_SEED) -> str:
    """Rendered training conversations with the special tokens cut out, plus the tiny model's sample."""
    template = ChatTemplate()
    texts = [TRAINING_SAMPLE]
    for conv in training_conversations(num_conversations, seed):
        last = len(conv.messages) - 1
        texts.append(render_prompt(template, conv, last) + generated_text(conv.messages[last]))
    return _SPECIALS.sub("\n", "\n".join(texts))


def write_demo_tokenizer(out_dir: str | Path, num_merges: int = NUM_MERGES,
                         num_conversations: int = NUM_CORPUS_CONVERSATIONS) -> None:
    write_tokenizer_files(out_dir, corpus_text(num_conversations), num_merges, split_capitalized=True,
                          whole_words=" ".join(ALL_CITIES))
