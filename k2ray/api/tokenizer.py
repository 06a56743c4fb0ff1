"""K2's tiktoken tokenizer: `tiktoken.model` + specials from `tokenizer_config.json`."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from k2ray.api.prompt_segments import PromptSegment

# K2's pre-tokenizer (tokenization_kimi.py). `&&` is a character-class intersection, which tiktoken's
# fancy-regex understands; Python's `regex` module needs the V1 flag for the same meaning.
K2_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_RESERVED_SPECIAL_TOKENS = 256
VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
IM_END = "<|im_end|>"

# tiktoken panics on very long inputs and on very long runs of (non-)whitespace (openai/tiktoken#195);
# K2 splits its input with these limits before encoding, and so do we so that token ids match.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUN_RE = re.compile(r"\s+|\S+")


def reserved_token_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Reads a tiktoken BPE file: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _token_content(value: str | dict | None) -> str | None:
    # HF configs store special tokens either as plain strings or as serialized AddedToken dicts.
    return value["content"] if isinstance(value, dict) else value


def _split_long_runs(text: str) -> list[str]:
    return [text[a:b] for a, b in _piece_bounds(text)]


def _piece_bounds(text: str) -> list[tuple[int, int]]:
    # K2 encodes chunks of MAX_ENCODE_CHARS, each cut with the same cut points as its
    # `_split_whitespaces_or_nonwhitespaces`: every MAX_RUN_CHARS chars inside any whitespace or
    # non-whitespace run, found with a regex instead of a per-char loop.
    if not text:
        return [(0, 0)]
    cuts = [0]
    for chunk_start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk_end = min(chunk_start + MAX_ENCODE_CHARS, len(text))
        for run in _RUN_RE.finditer(text, chunk_start, chunk_end):
            cuts.extend(range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS))
        cuts.append(chunk_end)
    return list(zip(cuts, cuts[1:], strict=False))


class K2Tokenizer:
    """Byte-level BPE tokenizer in K2's on-disk format.

    Base tokens (ids 0..num_base_tokens-1) come from `tiktoken.model`; the 256 special slots follow,
    named from `added_tokens_decoder` in `tokenizer_config.json` (unnamed slots `<|reserved_token_{id}|>`).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], tokenizer_config: dict, name: str = "k2") -> None:
        self.num_base_tokens = len(mergeable_ranks)
        named = {int(i): _token_content(t) for i, t in tokenizer_config.get("added_tokens_decoder", {}).items()}
        special_ids = range(self.num_base_tokens, self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS)
        by_id = {i: named.get(i, reserved_token_name(i)) for i in special_ids}
        by_id.update({i: c for i, c in named.items() if i >= self.num_base_tokens})
        self.special_token_ids: dict[str, int] = {content: i for i, content in sorted(by_id.items())}
        self._special_by_id = by_id
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=K2_PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_token_ids
        )
        self._bytes_by_id = {rank: token for token, rank in mergeable_ranks.items()}
        # Longest first, so a special that is a prefix of another never wins.
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special_token_ids, key=len,
                                                                              reverse=True)))
        self.vocab_size = max(by_id) + 1
        # tokenization_kimi.py defaults: bos "[BOS]", eos "[EOS]"; pad/unk may be absent.
        self.bos_token_id = self.token_id(_token_content(tokenizer_config.get("bos_token")) or "[BOS]")
        self.eos_token_id = self.token_id(_token_content(tokenizer_config.get("eos_token")) or "[EOS]")
        pad, unk = (_token_content(tokenizer_config.get(k)) for k in ("pad_token", "unk_token"))
        self.pad_token_id = self.token_id(pad) if pad else None
        self.unk_token_id = self.token_id(unk) if unk else None
        # A K2 turn ends with <|im_end|>; [EOS] may follow as a guard token. Stop on both.
        self.stop_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in (self.special_token_ids.get(IM_END), self.eos_token_id) if i is not None)
        )

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> K2Tokenizer:
        checkpoint_dir = Path(checkpoint_dir)
        ranks = load_tiktoken_ranks(checkpoint_dir / VOCAB_FILE)
        config_path = checkpoint_dir / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        return cls(ranks, config, name=checkpoint_dir.name)

    def token_id(self, content: str) -> int:
        if content in self.special_token_ids:
            return self.special_token_ids[content]
        return self._encoding.encode_single_token(content.encode("utf-8"))

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode("utf-8")
        return self._bytes_by_id[token_id]

    def encode(self, text: str, allow_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for start, end in _piece_bounds(text):
            if allow_special_tokens:
                ids.extend(self._encoding.encode(text[start:end], allowed_special="all"))
            else:
                ids.extend(self._encoding.encode_ordinary(text[start:end]))
        return ids

    def encode_segments(self, segments: Sequence[PromptSegment]) -> list[int]:
        """Token ids of a rendered prompt: special-token strings become control tokens only inside trusted
        segments; untrusted text is plain BPE. With no special-token string in untrusted text, this gives
        the same ids as `encode` of the joined text."""
        text = "".join(s.text for s in segments)
        specials = self._trusted_special_spans(segments)
        ids: list[int] = []
        spans = iter(specials)
        span = next(spans, None)
        for start, end in _piece_bounds(text):
            pos = start
            # A special cut by a piece boundary is plain text, as `encode` treats it.
            while span is not None and span[0] < end:
                if span[0] >= pos and span[1] <= end:
                    ids.extend(self._encoding.encode_ordinary(text[pos : span[0]]))
                    ids.append(span[2])
                    pos = span[1]
                span = next(spans, None)
            ids.extend(self._encoding.encode_ordinary(text[pos:end]))
        return ids

    def _trusted_special_spans(self, segments: Sequence[PromptSegment]) -> list[tuple[int, int, int]]:
        # (start, end, token id) of each special-token string inside a trusted segment, in joined-text offsets.
        spans = []
        offset = 0
        for seg in segments:
            if seg.is_trusted:
                spans.extend((offset + m.start(), offset + m.end(), self.special_token_ids[m.group()])
                             for m in self._special_re.finditer(seg.text))
            offset += len(seg.text)
        return spans

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i not in self._special_by_id]
        return self._encoding.decode(token_ids, errors="replace")
