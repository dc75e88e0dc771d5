"""tokenizer.json decoders: token strings -> text, each step a list of strings -> list of strings."""

from typing import Any

import regex

from perfxlm.tokenizer.errors import unsupported
from perfxlm.tokenizer.normalizers import compile_pattern
from perfxlm.tokenizer.unicode import CHAR_BYTES

_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")


class Decoder:
    def decode(self, tokens: list[str]) -> str:
        return "".join(self.decode_chain(tokens))

    def decode_chain(self, tokens: list[str]) -> list[str]:
        raise NotImplementedError


class Sequence(Decoder):
    def __init__(self, decoders: list[Decoder]) -> None:
        self.decoders = decoders

    def decode_chain(self, tokens: list[str]) -> list[str]:
        for d in self.decoders:
            tokens = d.decode_chain(tokens)
        return tokens


class ByteLevel(Decoder):
    """Byte-level characters back to bytes, then UTF-8 with U+FFFD for each invalid sequence.
    A token with a character outside the byte alphabet (an added token) keeps its own UTF-8."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        data = bytearray()
        for t in tokens:
            try:
                data.extend(CHAR_BYTES[c] for c in t)
            except KeyError:
                data.extend(t.encode("utf-8"))
        return [data.decode("utf-8", errors="replace")]


class Metaspace(Decoder):
    """▁ -> ' ', except a leading one on the first token when the pre-tokenizer prepends it."""

    def __init__(self, replacement: str, prepend_scheme: str) -> None:
        self.replacement = replacement
        self.prepend_scheme = prepend_scheme

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out = [t.replace(self.replacement, " ") for t in tokens]
        if out and self.prepend_scheme != "never":
            out[0] = tokens[0].replace(self.replacement, "")
        return out


class Replace(Decoder):
    def __init__(self, pattern: dict[str, str], content: str) -> None:
        self.regex = compile_pattern(pattern)
        self.content = content

    def decode_chain(self, tokens: list[str]) -> list[str]:
        return [self.regex.sub(lambda _: self.content, t) for t in tokens]


class ByteFallback(Decoder):
    """Runs of <0xXX> tokens -> their UTF-8 text, or one U+FFFD per byte if the run is not UTF-8."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out: list[str] = []
        pending = bytearray()
        for t in tokens:
            m = _BYTE_TOKEN.fullmatch(t) if len(t) == 6 else None
            if m is not None:
                pending.append(int(m.group(1), 16))
                continue
            if pending:
                out.extend(_utf8_or_replacements(pending))
                pending.clear()
            out.append(t)
        if pending:
            out.extend(_utf8_or_replacements(pending))
        return out


def _utf8_or_replacements(data: bytearray) -> list[str]:
    try:
        return [data.decode("utf-8")]
    except UnicodeDecodeError:
        return ["\ufffd"] * len(data)


class Fuse(Decoder):
    def decode_chain(self, tokens: list[str]) -> list[str]:
        return ["".join(tokens)]


class Strip(Decoder):
    """Up to `start` leading and `stop` trailing `content` characters removed from each token."""

    def __init__(self, content: str, start: int, stop: int) -> None:
        self.content = content
        self.start = start
        self.stop = stop

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out = []
        for t in tokens:
            a = 0
            while a < min(self.start, len(t)) and t[a] == self.content:
                a += 1
            b = len(t)
            while len(t) - b < self.stop and b > a and t[b - 1] == self.content:
                b -= 1
            out.append(t[a:b])
        return out


class WordPiece(Decoder):
    """'##' continuations glued to the previous token, others after a space; optional cleanup."""

    def __init__(self, prefix: str, cleanup: bool) -> None:
        self.prefix = prefix
        self.cleanup = cleanup

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out = []
        for i, t in enumerate(tokens):
            if i:
                t = t[len(self.prefix):] if t.startswith(self.prefix) else " " + t
            out.append(wordpiece_cleanup(t) if self.cleanup else t)
        return out


def wordpiece_cleanup(text: str) -> str:
    """The tokenizers library's cleanup (the WordPiece decoder's; not transformers' own)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class BPEDecoder(Decoder):
    """end_of_word suffixes -> a space (none after the last token)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def decode_chain(self, tokens: list[str]) -> list[str]:
        n = len(tokens) - 1
        return [t.replace(self.suffix, "" if i == n else " ") for i, t in enumerate(tokens)]


def from_json(spec: dict[str, Any] | None) -> Decoder | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return Sequence([from_json(d) for d in spec["decoders"]])
    if kind == "ByteLevel":
        return ByteLevel()
    if kind == "Metaspace":
        scheme = spec.get("prepend_scheme", "always")
        if spec.get("add_prefix_space") is False:
            scheme = "never"
        return Metaspace(spec.get("replacement", "▁"), scheme)
    if kind == "Replace":
        return Replace(spec["pattern"], spec["content"])
    if kind == "ByteFallback":
        return ByteFallback()
    if kind == "Fuse":
        return Fuse()
    if kind == "Strip":
        return Strip(spec["content"], spec.get("start", 0), spec.get("stop", 0))
    if kind == "WordPiece":
        return WordPiece(spec.get("prefix", "##"), spec.get("cleanup", True))
    if kind == "BPEDecoder":
        return BPEDecoder(spec.get("suffix", "</w>"))
    raise unsupported("decoder", kind)
