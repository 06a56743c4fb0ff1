"""EBNF rules for JSON's lexical pieces (strings, numbers, whitespace) in which no excluded text can occur.

xgrammar's own schema converter drops minLength/maxLength when exclusions are set, and its length-bounded
strings allow raw control characters (invalid JSON); these rules keep both. A string without length
bounds runs a small automaton over the excluded texts (one rule per proper prefix of one of them), so it
may hold any text but those. A string with length bounds counts code points, one rule per position (a
`{m,n}` repetition of a rule with alternatives costs xgrammar ~100x more per token mask); such a string
may not hold the first character of any excluded text raw (it can still write it as a `\\u` escape),
which keeps every excluded text out without multiplying the count by the automaton's states. Past
MAX_CHAINED_LENGTH positions a bound is a repetition of plain characters (no escapes) instead.
Every `\\u` escape is one code point (no surrogate halves), so a count of units is a count of code points.
Numbers with bounds come from xgrammar's converter (its range rules), their rules renamed into ours.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import xgrammar as xgr

# Characters a JSON string may not hold raw: the quote, the backslash and the control characters.
_JSON_STRING_FORBIDDEN = '"\\' + "".join(chr(c) for c in range(0x20))
# One escape, one code point: no \uD800-\uDFFF halves (a pair would count as two units but is one).
ESCAPE_RULE = ('([\\"\\\\/bfnrt] | "u" ([0-9a-cA-CeEfF] HEX HEX HEX | [dD] [0-7] HEX HEX))')
# Unbounded digit runs let a model write one number until max_tokens: a valid subset keeps them short.
MAX_INTEGER_DIGITS = 15
MAX_FRACTION_DIGITS = 6
# Longest bound a string counts with one rule per position (escapes allowed); longer ones repeat a class.
MAX_CHAINED_LENGTH = 128
_EBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z_][A-Za-z0-9_]*|\s+|.')
_RULE_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) ::= (.*)$")


def char_class(chars: str, negated: bool = False) -> str:
    """An EBNF character class of `chars`, runs as ranges, every character escaped (so none is special)."""
    codes = sorted({ord(c) for c in chars})
    runs: list[list[int]] = []
    for code in codes:
        if runs and runs[-1][1] == code - 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    body = "".join(_escaped(lo) if lo == hi else f"{_escaped(lo)}-{_escaped(hi)}" for lo, hi in runs)
    return f"[{'^' if negated else ''}{body}]"


def _escaped(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def literal(text: str) -> str:
    """An EBNF string literal matching `text` exactly."""
    return '"' + "".join(_escaped(ord(c)) if not c.isalnum() or ord(c) > 0x7E else c for c in text) + '"'


class JsonTextRules:
    """The shared lexical rules of one grammar, added on first use: `rules` maps a rule name to its body."""

    def __init__(self, excluded_text: Sequence[str], max_whitespace: int) -> None:
        if any(not text for text in excluded_text):
            raise ValueError("excluded texts must be non-empty")
        self.excluded_text = tuple(excluded_text)
        self.max_whitespace = max_whitespace
        self.rules: dict[str, str] = {}
        self._num_bounded = 0

    def _add(self, name: str, body: str) -> str:
        self.rules.setdefault(name, body)
        return name

    def whitespace(self) -> str:
        return self._add("ws", f"[ \\n\\r\\t]{{0,{self.max_whitespace}}}" if self.max_whitespace else '""')

    def _escape(self) -> str:
        self._add("HEX", "[0-9a-fA-F]")
        return self._add("escape", ESCAPE_RULE)

    def free_string(self) -> str:
        """Any JSON string that holds none of the excluded texts."""
        if "string" not in self.rules:
            self._add_automaton()
            self._add("string", '"\\"" str_0')
        return "string"

    def bounded_string(self, min_length: int, max_length: int | None) -> str:
        """A JSON string of min_length..max_length code points (None: no upper bound)."""
        starts = "".join(text[0] for text in self.excluded_text)
        unit = char_class(_JSON_STRING_FORBIDDEN + starts, negated=True)
        name = f"string_{min_length}_{'inf' if max_length is None else max_length}"
        counted = min_length if max_length is None else max_length
        if counted <= MAX_CHAINED_LENGTH:
            return self._add(name, f'"\\"" {self._chain(unit, counted, min_length, max_length is None)}')
        # Too long to chain: plain characters only (no escape, so no quote, backslash or newline).
        if max_length is not None:
            return self._add(name, f'"\\"" {unit}{{{min_length},{max_length}}} "\\""')
        self.free_string()  # after min_length units the automaton starts afresh: no unit began an excluded text
        return self._add(name, f'"\\"" {unit}{{{min_length}}} str_0')

    def _chain(self, unit: str, num_left: int, num_needed: int, is_open: bool) -> str:
        """The rest of a bounded string with room for num_left more units, num_needed of them still owed;
        one rule per position (xgrammar masks a `{m,n}` of a rule with alternatives far slower). An open
        string (no maxLength) goes on as a free one once its minLength is met."""
        name = f"bstr_{num_left}_{num_needed}_{'open' if is_open else 'closed'}"
        if name in self.rules:
            return name
        if is_open and num_needed == 0:
            self.free_string()
            return "str_0"
        arms = ['"\\""'] if num_needed == 0 else []
        if num_left > 0:
            rest = self._chain(unit, num_left - 1, max(num_needed - 1, 0), is_open)
            arms += [f"{unit} {rest}", f'"\\\\" {self._escape()} {rest}']
        return self._add(name, " | ".join(arms))

    def _add_automaton(self) -> None:
        """str_K: the rest of a string after text whose longest suffix that begins an excluded text is
        prefix K (str_0: none). Each rule ends the string, takes an escape, or takes a character that
        does not complete an excluded text."""
        prefixes = sorted({text[:i] for text in self.excluded_text for i in range(len(text))}, key=len)
        index = {prefix: i for i, prefix in enumerate(prefixes)}
        alphabet = sorted({c for text in self.excluded_text for c in text} - set(_JSON_STRING_FORBIDDEN))
        other = char_class(_JSON_STRING_FORBIDDEN + "".join(alphabet), negated=True)
        for prefix in prefixes:
            by_next: dict[int, list[str]] = defaultdict(list)
            for c in alphabet:
                after = prefix + c
                if any(after.endswith(text) for text in self.excluded_text):
                    continue
                by_next[index[next(after[i:] for i in range(len(after) + 1) if after[i:] in index)]].append(c)
            arms = ['"\\""', f'"\\\\" {self._escape()} str_0', f"{other} str_0"]
            arms += [f"{char_class(''.join(chars))} str_{state}" for state, chars in sorted(by_next.items())]
            self._add(f"str_{index[prefix]}", " | ".join(arms))

    def integer(self) -> str:
        return self._add("integer", f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_INTEGER_DIGITS - 1}}})')

    def number(self) -> str:
        return self._add("number", f'{self.integer()} ("." [0-9]{{1,{MAX_FRACTION_DIGITS}}})?')

    def bounded_number(self, schema: dict[str, Any]) -> str:
        """A number or integer within the schema's bounds (minimum, maximum and their exclusive forms)."""
        self._num_bounded += 1
        prefix = f"num{self._num_bounded}_"
        grammar = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
        for line in grammar.splitlines():
            match = _RULE_LINE.match(line)
            if match:
                self.rules[prefix + match[1]] = match[2]
        names = {name.removeprefix(prefix) for name in self.rules if name.startswith(prefix)}
        for name in [n for n in self.rules if n.startswith(prefix)]:
            self.rules[name] = _rename(self.rules[name], names, prefix)
        return prefix + "root"


def _rename(body: str, names: set[str], prefix: str) -> str:
    return "".join(prefix + token if token in names else token for token in _EBNF_TOKEN.findall(body))
