"""Phrasing variation for the demo's user turns: templates with a held-out share, and surface noise
(casing, punctuation, politeness, typos) applied to the template words only, never to the values."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

HELDOUT_EVERY = 5  # every fifth template (and a fifth of the values) is kept out of training
PLACEHOLDER = re.compile(r"\{[a-z_0-9]+\}")
PREFIXES = ("please ", "hey, ", "hi! ", "Kimi, ", "hello. ", "quick question: ", "ok so ", "yo ")
SUFFIXES = (" thanks", " thank you!", " pls", " please", " thx", " :)", " asap")
P_LOWER, P_UPPER, P_STRIP_END, P_SHOUT, P_PREFIX, P_SUFFIX, P_TYPO, P_DOUBLE_SPACE = (
    0.2, 0.04, 0.3, 0.08, 0.2, 0.15, 0.05, 0.04)
MIN_TYPO_WORD = 4


def is_heldout(key: str, salt: str = "demo") -> bool:
    """A stable 1-in-HELDOUT_EVERY split of values (cities, numbers, documents) by hash."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def split_templates(templates: Sequence[str], heldout: bool) -> list[str]:
    return [t for i, t in enumerate(templates) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout]


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def _noisy_words(text: str, rng: random.Random) -> str:
    parts = re.split(r"(\s+)", text)
    out = []
    for part in parts:
        if len(part) >= MIN_TYPO_WORD and part.isalpha() and rng.random() < P_TYPO:
            part = _typo(part, rng)
        out.append(part)
    return "".join(out)


def vary(template: str, rng: random.Random) -> str:
    """Surface noise on a template; placeholders ({city}, ...) pass through untouched."""
    pieces = PLACEHOLDER.split(template)
    names = PLACEHOLDER.findall(template)
    lower, upper = rng.random() < P_LOWER, rng.random() < P_UPPER
    out = []
    for i, piece in enumerate(pieces):
        piece = _noisy_words(piece, rng)
        if lower:
            piece = piece.lower()
        elif upper:
            piece = piece.upper()
        out.append(piece)
        if i < len(names):
            out.append(names[i])
    text = "".join(out)
    if rng.random() < P_STRIP_END:
        text = text.rstrip("?.!")
    elif rng.random() < P_SHOUT and text[-1:] in "?!.":
        text = text + text[-1] * rng.randrange(1, 3)
    if rng.random() < P_PREFIX:
        text = rng.choice(PREFIXES) + text
    if rng.random() < P_SUFFIX:
        text = text + rng.choice(SUFFIXES)
    if rng.random() < P_DOUBLE_SPACE:
        text = text.replace(" ", "  ", 1)
    return text


def phrase(templates: Sequence[str], heldout: bool, rng: random.Random, **values: object) -> str:
    """A varied user turn from the train or held-out share of `templates`, values filled in."""
    template = vary(rng.choice(split_templates(templates, heldout)), rng)
    return template.format(**values)
