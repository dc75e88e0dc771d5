"""Added tokens: found in the text before anything else, as the tokenizers library's
AddedVocabulary finds them (leftmost-longest, with single_word / lstrip / rstrip)."""

from dataclasses import dataclass
from typing import Any

import regex

from perfxlm.tokenizer.normalizers import Normalizer
from perfxlm.tokenizer.unicode import WHITESPACE_CHAR, WORD

_WORD_CHAR = regex.compile(WORD)

# a piece of input text: (text, added token id or None, starts at offset 0 of the input)
Segment = tuple[str, int | None, bool]


@dataclass
class AddedToken:
    content: str
    single_word: bool = False  # only match where not inside a word
    lstrip: bool = False       # also swallow the whitespace on its left
    rstrip: bool = False       # ... and on its right
    normalized: bool = True    # matched in the normalized text (else in the raw text)
    special: bool = False      # skipped by decode(skip_special_tokens=True)

    @classmethod
    def from_json(cls, spec: dict[str, Any] | str, special: bool | None = None) -> "AddedToken":
        """An entry of tokenizer.json's added_tokens or tokenizer_config.json's added_tokens_decoder,
        or a bare string (then `special` decides, and special tokens are not normalized)."""
        if isinstance(spec, str):
            special = bool(special)
            return cls(spec, normalized=not special, special=special)
        kw = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
        if special is not None:
            kw["special"] = special
        kw.setdefault("normalized", not kw.get("special", False))
        return cls(spec["content"], **kw)


class AddedVocabulary:
    def __init__(self) -> None:
        self.tokens: dict[int, AddedToken] = {}     # id -> token
        self.ids: dict[str, int] = {}               # content -> id
        self.special: set[str] = set()              # contents of the special tokens
        self.normalized_forms: dict[int, str] = {}  # id -> content normalized, where that differs
        self._raw: regex.Pattern | None = None      # matches the tokens with normalized=False
        self._normalized: regex.Pattern | None = None
        self._normalized_ids: dict[str, int] = {}   # normalized form -> id

    def add(self, tokens: list[AddedToken], model_vocab: dict[str, int], normalizer: Normalizer | None) -> None:
        """Add tokens; each takes the id its content already has (added or in the model's
        vocabulary), else the next free id after both vocabularies."""
        size = len(model_vocab)
        top = max(self.tokens, default=None)
        next_id = size if top is None else top + 1 if top >= size or size == 0 else size
        for tok in tokens:
            if not tok.content or self.tokens.get(self.ids.get(tok.content, -1)) == tok:
                continue
            new_id = self.ids.get(tok.content, model_vocab.get(tok.content))
            if new_id is None:
                new_id, next_id = next_id, next_id + 1
            if tok.normalized and normalizer is not None:
                normed = normalizer.normalize(tok.content)
                if normed != tok.content:
                    self.normalized_forms[new_id] = normed
            self.ids[tok.content] = new_id
            if tok.special:
                self.special.add(tok.content)
            self.tokens[new_id] = tok
        self._raw = _alternation([t.content for t in self.tokens.values() if not t.normalized])
        self._normalized_ids = {self.normalized_forms.get(i, t.content): i
                                for i, t in self.tokens.items() if t.normalized}
        self._normalized = _alternation(list(self._normalized_ids))

    def split(self, text: str, normalizer: Normalizer | None, split_special_tokens: bool) -> list[Segment]:
        """text -> segments: added tokens (with their id) and normalized text between them."""
        out: list[Segment] = []
        for piece, token, at_start in self._find(text, at_start=True, normalized=False,
                                                 skip_special=split_special_tokens):
            if token is not None:
                out.append((piece, token, at_start))
                continue
            if normalizer is not None:
                piece = normalizer.normalize(piece)
            out.extend(self._find(piece, at_start, normalized=True, skip_special=split_special_tokens))
        return out

    def _find(self, sentence: str, at_start: bool, normalized: bool, skip_special: bool) -> list[Segment]:
        """sentence -> its pieces: the added tokens found in it, and the text around them (non-empty)."""
        pattern = self._normalized if normalized else self._raw
        if pattern is None or not sentence:
            return [(sentence, None, at_start)] if sentence else []
        out: list[Segment] = []
        offset = 0
        n = len(sentence)
        for m in pattern.finditer(sentence):
            start, stop = m.span()
            token_id = self._normalized_ids[m.group()] if normalized else self.ids[m.group()]
            tok = self.tokens[token_id]
            if skip_special and tok.special:
                continue
            if tok.single_word and ((start > 0 and _WORD_CHAR.match(sentence[start - 1]))
                                    or (stop < n and _WORD_CHAR.match(sentence[stop]))):
                continue  # inside a word
            if tok.lstrip:  # the whitespace before it, back to the previous match at most
                while start > offset and WHITESPACE_CHAR.match(sentence[start - 1]):
                    start -= 1
            if tok.rstrip:
                while stop < n and WHITESPACE_CHAR.match(sentence[stop]):
                    stop += 1
            if offset < start:
                out.append((sentence[offset:start], None, at_start and offset == 0))
            out.append((sentence[start:stop], token_id, at_start and start == 0))
            offset = stop
        if offset != len(sentence):
            out.append((sentence[offset:], None, at_start and offset == 0))
        return out


def _alternation(contents: list[str]) -> regex.Pattern | None:
    """One pattern matching any of contents, longest first: regex alternation takes the first
    alternative that matches, so this finds the leftmost-longest match, as the tokenizers
    library's automaton does."""
    if not contents:
        return None
    return regex.compile("|".join(regex.escape(c) for c in sorted(set(contents), key=len, reverse=True)))
