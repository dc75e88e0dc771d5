"""tokenizer.json normalizers: str -> str, as the `tokenizers` library applies them.

No offsets are kept (the engine needs ids and text only), so each normalizer is a plain
function of the text between two added tokens.
"""

import unicodedata
from typing import Any

import regex

from perfxlm.tokenizer.errors import unsupported
from perfxlm.tokenizer.unicode import WHITESPACE, lowercase


class Normalizer:
    def normalize(self, text: str) -> str:
        raise NotImplementedError


class Sequence(Normalizer):
    def __init__(self, normalizers: list[Normalizer]) -> None:
        self.normalizers = normalizers

    def normalize(self, text: str) -> str:
        for n in self.normalizers:
            text = n.normalize(text)
        return text


class Unicode(Normalizer):
    """NFC, NFD, NFKC or NFKD."""

    def __init__(self, form: str) -> None:
        self.form = form

    def normalize(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


class Lowercase(Normalizer):
    def normalize(self, text: str) -> str:
        return lowercase(text)


class Prepend(Normalizer):
    def __init__(self, prepend: str) -> None:
        self.prepend = prepend

    def normalize(self, text: str) -> str:
        return self.prepend + text if text else text


class Replace(Normalizer):
    """Every match of a string or regex pattern -> content (taken literally, no group references)."""

    def __init__(self, pattern: dict[str, str], content: str) -> None:
        self.regex = compile_pattern(pattern)
        self.content = content

    def normalize(self, text: str) -> str:
        return self.regex.sub(lambda _: self.content, text)


class Strip(Normalizer):
    """Leading and/or trailing White_Space characters removed."""

    def __init__(self, strip_left: bool, strip_right: bool) -> None:
        self.left = regex.compile(rf"^{WHITESPACE}+") if strip_left else None
        self.right = regex.compile(rf"{WHITESPACE}+\Z") if strip_right else None

    def normalize(self, text: str) -> str:
        if self.left is not None:
            text = self.left.sub("", text)
        if self.right is not None:
            text = self.right.sub("", text)
        return text


class StripAccents(Normalizer):
    """Combining marks (Mn, Mc, Me) removed; meant to follow NFD/NFKD."""

    _MARK = regex.compile(r"\p{M}")

    def normalize(self, text: str) -> str:
        return self._MARK.sub("", text)


class BertNormalizer(Normalizer):
    # control characters (Cc, Cf, Co, Cs: not unassigned ones) other than \t \n \r, NUL and
    # U+FFFD are dropped; whitespace becomes ' '
    _CONTROL = regex.compile(r"[\x00\ufffd]|(?![\t\n\r])[\p{Cc}\p{Cf}\p{Co}\p{Cs}]")
    _SPACE = regex.compile(rf"[\t\n\r]|{WHITESPACE}")
    _CJK = regex.compile("([\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f"
                         "\U0002b740-\U0002b81f\U0002b920-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f])")
    _NONSPACING_MARK = regex.compile(r"\p{Mn}")

    def __init__(self, clean_text: bool = True, handle_chinese_chars: bool = True,
                 strip_accents: bool | None = None, lowercase: bool = True) -> None:
        self.clean_text = clean_text
        self.handle_chinese_chars = handle_chinese_chars
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.lowercase = lowercase

    def normalize(self, text: str) -> str:
        if self.clean_text:
            text = self._SPACE.sub(" ", self._CONTROL.sub("", text))
        if self.handle_chinese_chars:
            text = self._CJK.sub(r" \1 ", text)
        if self.strip_accents:
            text = self._NONSPACING_MARK.sub("", unicodedata.normalize("NFD", text))
        if self.lowercase:
            text = lowercase(text)
        return text


def compile_pattern(pattern: dict[str, str]) -> regex.Pattern:
    """tokenizer.json's {"String": s} (matched literally) or {"Regex": r} (Oniguruma syntax)."""
    if "String" in pattern:
        return regex.compile(regex.escape(pattern["String"]))
    return regex.compile(pattern["Regex"])


def from_json(spec: dict[str, Any] | None) -> Normalizer | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return Sequence([from_json(n) for n in spec["normalizers"]])
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return Unicode(kind)
    if kind == "Lowercase":
        return Lowercase()
    if kind == "Prepend":
        return Prepend(spec["prepend"])
    if kind == "Replace":
        return Replace(spec["pattern"], spec["content"])
    if kind == "Strip":
        return Strip(spec.get("strip_left", True), spec.get("strip_right", True))
    if kind == "StripAccents":
        return StripAccents()
    if kind == "BertNormalizer":
        return BertNormalizer(spec.get("clean_text", True), spec.get("handle_chinese_chars", True),
                              spec.get("strip_accents"), spec.get("lowercase", True))
    raise unsupported("normalizer", kind)
