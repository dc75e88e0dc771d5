"""A tokenizer.json read into its pipeline: added tokens, normalizer, pre-tokenizer, model,
post-processor, decoder, run in the order the `tokenizers` library runs them."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfxlm.tokenizer import decoders, models, normalizers, pre_tokenizers, processors
from perfxlm.tokenizer.added_vocabulary import AddedToken, AddedVocabulary


@dataclass
class Encoding:
    ids: list[int]
    type_ids: list[int]  # 0 for the first sequence, 1 for the pair's second (as the post-processor says)


class TokenizerPipeline:
    """What tokenizers.Tokenizer.from_file gives, for encode and decode: ids and text only, no offsets."""

    def __init__(self, spec: dict[str, Any]) -> None:
        # the file's "truncation" and "padding" are not read: transformers turns both off
        # unless a call asks for them
        self.normalizer = normalizers.from_json(spec.get("normalizer"))
        self.pre_tokenizer = pre_tokenizers.from_json(spec.get("pre_tokenizer"))
        self.model = models.from_json(spec["model"])
        self.post_processor = processors.from_json(spec.get("post_processor"))
        self.decoder = decoders.from_json(spec.get("decoder"))
        self.added = AddedVocabulary()
        self.add_tokens([AddedToken.from_json(t) for t in spec.get("added_tokens", [])])

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenizerPipeline":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def add_tokens(self, tokens: list[AddedToken]) -> None:
        self.added.add(tokens, self.model.vocab, self.normalizer)

    # ---- encode ---------------------------------------------------------------------

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True,
               split_special_tokens: bool = False) -> Encoding:
        """split_special_tokens: special tokens written in the text are encoded as plain text."""
        texts = [text] if pair is None else [text, pair]
        return self.post_process([self.encode_plain(t, split_special_tokens) for t in texts], add_special_tokens)

    def post_process(self, sequences: list[list[int]], add_special_tokens: bool = True) -> Encoding:
        """One or two sequences' ids -> the model's input, special tokens added (if asked)."""
        encodings = [(ids, [i] * len(ids)) for i, ids in enumerate(sequences)]
        if self.post_processor is not None:
            encodings = self.post_processor.process(encodings, add_special_tokens)
        return Encoding([t for ids, _ in encodings for t in ids], [t for _, ty in encodings for t in ty])

    def encode_plain(self, text: str, split_special_tokens: bool = False) -> list[int]:
        """text -> ids, with no special tokens added around it."""
        ids: list[int] = []
        words: list[pre_tokenizers.Piece] = []
        for piece, token, at_start in self.added.split(text, self.normalizer, split_special_tokens):
            if token is None:
                words.append((piece, at_start))
                continue
            ids.extend(self._tokenize_words(words))
            words = []
            ids.append(token)
        ids.extend(self._tokenize_words(words))
        return ids

    def _tokenize_words(self, pieces: list[pre_tokenizers.Piece]) -> list[int]:
        if self.pre_tokenizer is not None:
            pieces = self.pre_tokenizer.pre_tokenize(pieces)
        return [t for word, _ in pieces for t in self.model.tokenize(word)]

    def num_special_tokens_to_add(self, is_pair: bool) -> int:
        return 0 if self.post_processor is None else self.post_processor.added_tokens(is_pair)

    # ---- decode ---------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # unknown ids are dropped; special tokens are skipped by content, as tokenizers does
        return self.decode_tokens([t for t in map(self.id_to_token, ids) if t is not None
                                   and not (skip_special_tokens and t in self.added.special)])

    def decode_tokens(self, tokens: list[str]) -> str:
        return " ".join(tokens) if self.decoder is None else self.decoder.decode(tokens)

    # ---- vocabulary -----------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str | None:
        """An added token's (normalized) content, else the model's token; None if no such id."""
        if token_id in self.added.tokens:
            return self.added.normalized_forms.get(token_id, self.added.tokens[token_id].content)
        return self.model.vocab_r.get(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.added.ids.get(token, self.model.vocab.get(token))

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        vocab = dict(self.model.vocab)
        if with_added_tokens:
            vocab.update(self.added.ids)
        return vocab

    def vocab_size(self, with_added_tokens: bool = True) -> int:
        size = len(self.model.vocab)
        if with_added_tokens:
            size += sum(1 for t in self.added.ids if t not in self.model.vocab)
        return size
