"""tokenizer.json models: one pre-tokenized word -> token ids (BPE, WordPiece, WordLevel)."""

import heapq
from typing import Any

from perfxlm.tokenizer.errors import unsupported

_CACHE_CAPACITY = 10_000  # words, as the tokenizers library's BPE cache
_CACHE_MAX_WORD = 256     # longer words are not cached (ditto)


class Model:
    vocab: dict[str, int]

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab
        self.vocab_r = {i: t for t, i in vocab.items()}

    def tokenize(self, word: str) -> list[int]:
        raise NotImplementedError


class BPE(Model):
    """Byte-pair encoding: a word's symbols merged pair by pair, lowest merge rank first
    (leftmost among equal ranks), each word's result cached."""

    def __init__(self, vocab: dict[str, int], merges: list[str] | list[list[str]], unk_token: str | None = None,
                 continuing_subword_prefix: str | None = None, end_of_word_suffix: str | None = None,
                 fuse_unk: bool = False, byte_fallback: bool = False, ignore_merges: bool = False) -> None:
        super().__init__(vocab)
        self.unk_token = unk_token
        self.prefix = continuing_subword_prefix
        self.suffix = end_of_word_suffix
        self.fuse_unk = fuse_unk
        self.byte_fallback = byte_fallback
        self.ignore_merges = ignore_merges
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        prefix_len = len(continuing_subword_prefix or "")
        for rank, merge in enumerate(merges):
            if isinstance(merge, str):
                parts = merge.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"tokenizer.json BPE merge {merge!r} is not two tokens separated by a space")
                a, b = parts
            else:
                a, b = merge
            for t in (a, b, a + b[prefix_len:]):
                if t not in vocab:
                    raise ValueError(f"tokenizer.json BPE merge {merge!r}: token {t!r} is not in the vocabulary")
            self.merges[vocab[a], vocab[b]] = (rank, vocab[a + b[prefix_len:]])
        self.cache: dict[str, list[int]] = {}

    def tokenize(self, word: str) -> list[int]:
        if not word:
            return []
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids = self.cache.get(word)
        if ids is None:
            ids = self._merge_word(word)
            if len(word) < _CACHE_MAX_WORD and len(self.cache) < _CACHE_CAPACITY:
                self.cache[word] = ids
        return ids

    def _symbols(self, word: str) -> list[int]:
        """The word's characters as ids (with prefix/suffix, byte fallback, unknowns)."""
        symbols: list[int] = []
        unk: int | None = None  # a pending unknown, fused with the next one if fuse_unk
        last = len(word) - 1
        for i, c in enumerate(word):
            s = c
            if i > 0 and self.prefix:
                s = self.prefix + s
            if i == last and self.suffix:
                s = s + self.suffix
            t = self.vocab.get(s)
            if t is not None:
                if unk is not None:
                    symbols.append(unk)
                    unk = None
                symbols.append(t)
                continue
            if self.byte_fallback:
                fallback = [self.vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")]
                if None not in fallback:
                    symbols.extend(fallback)
                    continue
            if self.unk_token is not None:
                unk_id = self.vocab.get(self.unk_token)
                if unk_id is None:
                    raise ValueError(f"tokenizer.json BPE unk_token {self.unk_token!r} is not in the vocabulary")
                if unk is not None and not self.fuse_unk:
                    symbols.append(unk)
                unk = unk_id
        if unk is not None:
            symbols.append(unk)
        return symbols

    def _merge_word(self, word: str) -> list[int]:
        c = self._symbols(word)
        n = len(c)
        if n < 2:
            return c
        merges = self.merges
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get((c[i], c[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, pos, new_id = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right == -1:
                continue
            m = merges.get((c[pos], c[right]))
            if m is None or m[1] != new_id:  # an entry made stale by an earlier merge
                continue
            c[pos] = new_id
            alive[right] = False
            nxt[pos] = after = nxt[right]
            if after != -1:
                prv[after] = pos
            before = prv[pos]
            if before != -1 and (m := merges.get((c[before], new_id))) is not None:
                heapq.heappush(heap, (m[0], before, m[1]))
            if after != -1 and (m := merges.get((new_id, c[after]))) is not None:
                heapq.heappush(heap, (m[0], pos, m[1]))
        return [t for t, a in zip(c, alive) if a]


class WordPiece(Model):
    """Greedy longest-prefix match; the whole word is unk_token if any part fails."""

    def __init__(self, vocab: dict[str, int], unk_token: str = "[UNK]", continuing_subword_prefix: str = "##",
                 max_input_chars_per_word: int = 100) -> None:
        super().__init__(vocab)
        self.unk_token = unk_token
        self.prefix = continuing_subword_prefix
        self.max_chars = max_input_chars_per_word

    def tokenize(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self._unk()]
        ids = []
        start = 0
        while start < len(word):
            end = len(word)
            while start < end:
                sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                t = self.vocab.get(sub)
                if t is not None:
                    ids.append(t)
                    break
                end -= 1
            if start == end:
                return [self._unk()]
            start = end
        return ids

    def _unk(self) -> int:
        if self.unk_token not in self.vocab:
            raise ValueError(f"tokenizer.json WordPiece unk_token {self.unk_token!r} is not in the vocabulary")
        return self.vocab[self.unk_token]


class WordLevel(Model):
    def __init__(self, vocab: dict[str, int], unk_token: str | None = None) -> None:
        super().__init__(vocab)
        self.unk_token = unk_token

    def tokenize(self, word: str) -> list[int]:
        t = self.vocab.get(word)
        if t is None:
            if self.unk_token not in self.vocab:
                raise ValueError(f"tokenizer.json WordLevel: {word!r} is not in the vocabulary and there is no "
                                 f"unk_token to stand for it")
            t = self.vocab[self.unk_token]
        return [t]


def from_json(spec: dict[str, Any]) -> Model:
    kind = spec.get("type")
    if kind is None:  # older files leave the type out; the fields tell the models apart
        kind = "BPE" if "merges" in spec else "WordPiece" if "continuing_subword_prefix" in spec else "WordLevel"
    if kind == "BPE":
        if spec.get("dropout") not in (None, 0, 0.0):
            raise unsupported("model", f"BPE with dropout={spec['dropout']}")
        return BPE(spec["vocab"], spec["merges"], spec.get("unk_token"), spec.get("continuing_subword_prefix"),
                   spec.get("end_of_word_suffix"), spec.get("fuse_unk", False), spec.get("byte_fallback", False),
                   spec.get("ignore_merges", False))
    if kind == "WordPiece":
        return WordPiece(spec["vocab"], spec.get("unk_token", "[UNK]"), spec.get("continuing_subword_prefix", "##"),
                         spec.get("max_input_chars_per_word", 100))
    if kind == "WordLevel":
        return WordLevel(spec["vocab"], spec.get("unk_token"))
    raise unsupported("model", kind)
