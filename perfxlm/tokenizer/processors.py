"""tokenizer.json post-processors: the special tokens around one sequence or a pair.

An encoding here is (ids, type_ids); `process` gets one per sequence with type ids
0 and 1 already set, and returns them with the special tokens added, still one per
sequence (the pipeline concatenates them).
"""

from typing import Any

from perfxlm.tokenizer.errors import unsupported

Encoding = tuple[list[int], list[int]]  # (ids, type_ids)


class PostProcessor:
    def added_tokens(self, is_pair: bool) -> int:
        return 0

    def process(self, encodings: list[Encoding], add_special_tokens: bool) -> list[Encoding]:
        return encodings


class Sequence(PostProcessor):
    def __init__(self, processors: list[PostProcessor]) -> None:
        self.processors = processors

    def added_tokens(self, is_pair: bool) -> int:
        return sum(p.added_tokens(is_pair) for p in self.processors)

    def process(self, encodings: list[Encoding], add_special_tokens: bool) -> list[Encoding]:
        for p in self.processors:
            encodings = p.process(encodings, add_special_tokens)
        return encodings


class TemplateProcessing(PostProcessor):
    """"$A:0", "[BOS]:0" ... pieces for a single sequence and for a pair."""

    def __init__(self, single: list[dict], pair: list[dict], special_tokens: dict[str, dict]) -> None:
        self.single = single
        self.pair = pair
        self.special = {name: list(t["ids"]) for name, t in special_tokens.items()}
        for piece in single + pair:
            if "SpecialToken" in piece and piece["SpecialToken"]["id"] not in self.special:
                raise ValueError(f"tokenizer.json TemplateProcessing: missing special token "
                                 f"{piece['SpecialToken']['id']!r} in special_tokens")

    def added_tokens(self, is_pair: bool) -> int:
        return sum(len(self.special[p["SpecialToken"]["id"]])
                   for p in (self.pair if is_pair else self.single) if "SpecialToken" in p)

    def process(self, encodings: list[Encoding], add_special_tokens: bool) -> list[Encoding]:
        out: list[Encoding] = []
        for piece in self.pair if len(encodings) == 2 else self.single:
            if "Sequence" in piece:
                seq = piece["Sequence"]
                ids = encodings[0 if seq["id"] == "A" else 1][0]
                out.append((ids, [seq["type_id"]] * len(ids)))
            elif add_special_tokens:
                tok = piece["SpecialToken"]
                ids = self.special[tok["id"]]
                out.append((ids, [tok["type_id"]] * len(ids)))
        return out


class BertProcessing(PostProcessor):
    """[CLS] A [SEP] (B [SEP]), type ids 0 for the first part and 1 for the second."""

    def __init__(self, sep: int, cls: int) -> None:
        self.sep = sep
        self.cls = cls

    def added_tokens(self, is_pair: bool) -> int:
        return 3 if is_pair else 2

    def process(self, encodings: list[Encoding], add_special_tokens: bool) -> list[Encoding]:
        if not add_special_tokens:
            return encodings
        (a, ta), *rest = encodings
        out = [([self.cls, *a, self.sep], [0, *ta, 0])]
        for b, tb in rest:
            out.append(([*b, self.sep], [*tb, 1]))
        return out


class RobertaProcessing(PostProcessor):
    """<s> A </s> (</s> B </s>), every type id 0."""

    def __init__(self, sep: int, cls: int) -> None:
        self.sep = sep
        self.cls = cls

    def added_tokens(self, is_pair: bool) -> int:
        return 4 if is_pair else 2

    def process(self, encodings: list[Encoding], add_special_tokens: bool) -> list[Encoding]:
        encodings = [(ids, [0] * len(ids)) for ids, _ in encodings]
        if not add_special_tokens:
            return encodings
        (a, _), *rest = encodings
        out = [([self.cls, *a, self.sep], [0] * (len(a) + 2))]
        for b, _ in rest:
            out.append(([self.sep, *b, self.sep], [0] * (len(b) + 2)))
        return out


class ByteLevel(PostProcessor):
    """Only trims offsets, which are not kept here: the ids are left as they are."""


def from_json(spec: dict[str, Any] | None) -> PostProcessor | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return Sequence([from_json(p) for p in spec["processors"]])
    if kind == "TemplateProcessing":
        return TemplateProcessing(spec["single"], spec["pair"], spec.get("special_tokens", {}))
    if kind == "BertProcessing":
        return BertProcessing(spec["sep"][1], spec["cls"][1])
    if kind == "RobertaProcessing":
        return RobertaProcessing(spec["sep"][1], spec["cls"][1])
    if kind == "ByteLevel":
        return ByteLevel()
    raise unsupported("post_processor", kind)
