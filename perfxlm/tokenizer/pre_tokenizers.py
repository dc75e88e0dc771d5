"""tokenizer.json pre-tokenizers: split the text between added tokens into words.

A piece is (text, at_start): at_start says the piece begins at offset 0 of the input
(Metaspace's prepend_scheme "first" prepends only there). Empty pieces are dropped, as
the `tokenizers` library drops them.
"""

from typing import Any

import regex

from perfxlm.tokenizer.errors import unsupported
from perfxlm.tokenizer.normalizers import compile_pattern
from perfxlm.tokenizer.unicode import (NUMERIC, NUMERIC_CHAR, PUNCTUATION_CHAR, WHITESPACE, WHITESPACE_CHAR,
                                      WORD, to_byte_level)

Piece = tuple[str, bool]

# GPT-2's word rule, the ByteLevel pre-tokenizer's when use_regex
_GPT2_WORDS = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# the Whitespace pre-tokenizer's `\w+|[^\w\s]+`, with Rust's \w and \s
_WORDS_OR_SYMBOLS = regex.compile(rf"{WORD}+|(?:(?!{WORD}|{WHITESPACE}).)+", regex.DOTALL)
_NUMBERS = regex.compile(rf"{NUMERIC}+")


def split(text: str, at_start: bool, pattern: regex.Pattern, behavior: str, invert: bool = False) -> list[Piece]:
    """NormalizedString::split: the pattern's matches (or, inverted, what lies between them)
    are the delimiters; behavior says what becomes of them."""
    spans: list[tuple[int, int, bool]] = []  # (start, end, is delimiter), covering text
    prev = 0
    for m in pattern.finditer(text):
        if m.start() != prev:
            spans.append((prev, m.start(), invert))
        spans.append((m.start(), m.end(), not invert))
        prev = m.end()
    if prev != len(text):
        spans.append((prev, len(text), invert))

    kept: list[list[int]] = []  # [start, end] of each piece
    if behavior == "Removed":
        kept = [[s, e] for s, e, delim in spans if not delim]
    elif behavior == "Isolated":
        kept = [[s, e] for s, e, _ in spans]
    elif behavior == "Contiguous":  # adjacent spans of one kind (delimiter or not) become one piece
        previous = False
        for s, e, delim in spans:
            if kept and delim == previous:
                kept[-1][1] = e
            else:
                kept.append([s, e])
            previous = delim
    elif behavior == "MergedWithPrevious":
        previous = False
        for s, e, delim in spans:
            if kept and delim and not previous:
                kept[-1][1] = e
            else:
                kept.append([s, e])
            previous = delim
    elif behavior == "MergedWithNext":
        previous = False
        for s, e, delim in reversed(spans):
            if kept and delim and not previous:
                kept[-1][0] = s
            else:
                kept.append([s, e])
            previous = delim
        kept.reverse()
    else:
        raise unsupported("pre_tokenizer split behavior", behavior)
    return [(text[s:e], at_start and s == 0) for s, e in kept if e > s]


class PreTokenizer:
    def pre_tokenize(self, pieces: list[Piece]) -> list[Piece]:
        return [p for text, at_start in pieces if text for p in self.split(text, at_start)]

    def split(self, text: str, at_start: bool) -> list[Piece]:
        raise NotImplementedError


class Sequence(PreTokenizer):
    def __init__(self, steps: list[PreTokenizer]) -> None:
        self.steps = steps

    def pre_tokenize(self, pieces: list[Piece]) -> list[Piece]:
        for step in self.steps:
            pieces = step.pre_tokenize(pieces)
        return pieces


class Split(PreTokenizer):
    """Split on a pattern (tokenizer.json's Split, and the fixed ones: Digits, Punctuation, ...)."""

    def __init__(self, pattern: regex.Pattern, behavior: str, invert: bool = False) -> None:
        self.pattern = pattern
        self.behavior = behavior
        self.invert = invert

    def split(self, text: str, at_start: bool) -> list[Piece]:
        return split(text, at_start, self.pattern, self.behavior, self.invert)


class ByteLevel(PreTokenizer):
    """GPT-2's words (when use_regex), each mapped byte by byte to the byte-level alphabet."""

    def __init__(self, add_prefix_space: bool, use_regex: bool) -> None:
        self.add_prefix_space = add_prefix_space
        self.use_regex = use_regex

    def split(self, text: str, at_start: bool) -> list[Piece]:
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        if self.use_regex:
            return [(to_byte_level(w), a) for w, a in split(text, at_start, _GPT2_WORDS, "Isolated")]
        return [(to_byte_level(text), at_start)]


class Metaspace(PreTokenizer):
    """Spaces -> the replacement character (▁), one prepended per the scheme, then a split
    before each replacement character."""

    def __init__(self, replacement: str, prepend_scheme: str, split_words: bool) -> None:
        self.replacement = replacement
        self.prepend_scheme = prepend_scheme
        self.split_words = split_words
        self.pattern = regex.compile(regex.escape(replacement))

    def split(self, text: str, at_start: bool) -> list[Piece]:
        text = text.replace(" ", self.replacement)
        if not text.startswith(self.replacement) and (
                self.prepend_scheme == "always" or (self.prepend_scheme == "first" and at_start)):
            text = self.replacement + text
        if self.split_words:
            return split(text, at_start, self.pattern, "MergedWithNext")
        return [(text, at_start)] if text else []


class BertPreTokenizer(PreTokenizer):
    def split(self, text: str, at_start: bool) -> list[Piece]:
        return [q for p in split(text, at_start, WHITESPACE_CHAR, "Removed")
                for q in split(*p, PUNCTUATION_CHAR, "Isolated")]


def _metaspace(spec: dict[str, Any]) -> Metaspace:
    scheme = spec.get("prepend_scheme", "always")
    if spec.get("add_prefix_space") is False:  # the older field; tokenizers requires the two to agree
        if scheme != "never" and "prepend_scheme" in spec:
            raise ValueError("tokenizer.json Metaspace: add_prefix_space does not match declared prepend_scheme")
        scheme = "never"
    return Metaspace(spec.get("replacement", "▁"), scheme, spec.get("split", True))


def from_json(spec: dict[str, Any] | None) -> PreTokenizer | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return Sequence([from_json(p) for p in spec["pretokenizers"]])
    if kind == "Split":
        return Split(compile_pattern(spec["pattern"]), spec["behavior"], spec.get("invert", False))
    if kind == "ByteLevel":
        return ByteLevel(spec.get("add_prefix_space", True), spec.get("use_regex", True))
    if kind == "Metaspace":
        return _metaspace(spec)
    if kind == "Digits":
        if spec.get("individual_digits", False):
            return Split(NUMERIC_CHAR, "Isolated")
        return Split(_NUMBERS, "Isolated")  # adjacent digits merged: the same as runs isolated
    if kind == "Whitespace":
        return Split(_WORDS_OR_SYMBOLS, "Removed", invert=True)
    if kind == "WhitespaceSplit":
        return Split(WHITESPACE_CHAR, "Removed")
    if kind == "BertPreTokenizer":
        return BertPreTokenizer()
    if kind == "Punctuation":
        return Split(PUNCTUATION_CHAR, spec.get("behavior", "Isolated"))
    if kind == "CharDelimiterSplit":
        return Split(regex.compile(regex.escape(spec["delimiter"])), "Removed")
    raise unsupported("pre_tokenizer", kind)

