"""Incremental detokenisation: the DecodeStream path (fast tokenizers, as vLLM's
FastIncrementalDetokenizer) and the sliding-window path give the same text, token by token."""

import random

import pytest

from perfxlm.engine.detokenizer import IncrementalDetokenizer
from perfxlm.sampling_params import SamplingParams


class _SlowTokenizer:
    """The same tokenizer without its Rust backend: the detokenizer's window path."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def _pieces(tokenizer, prompt: list[int], output: list[int], **params) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(**params))
    texts = []
    for token_id in output:
        detok.update([token_id], stop_terminated=False)
        texts.append(detok.output_text)
    return texts, detok.backend is not None


@pytest.mark.parametrize("params", [{}, {"skip_special_tokens": False},
                                    {"skip_special_tokens": False, "spaces_between_special_tokens": False}])
def test_stream_and_window_give_the_same_text_token_by_token(smol_tokenizer, params):
    prompt = smol_tokenizer.encode("Write about caf\u00e9s:")
    texts = ["\u6211\u5f88\u611f\u8c22\u4f60\u7684\u70ed\u60c5 \U0001F680 na\u00efve caf\u00e9",  # split UTF-8
             "<|im_start|><|im_end|>x<|im_end|>", " ok  spaced\n\nlines"]
    rng = random.Random(0)
    outputs = [smol_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    outputs += [[rng.randrange(len(smol_tokenizer)) for _ in range(64)] for _ in range(8)]
    for text, output in zip(texts + [None] * 8, outputs):
        fast, streamed = _pieces(smol_tokenizer, prompt, output, **params)
        slow, windowed = _pieces(_SlowTokenizer(smol_tokenizer), prompt, output, **params)
        assert streamed and not windowed
        assert fast == slow
        if text is None:  # random tokens: nothing more to know
            continue
        assert not any("\ufffd" in t for t in fast)  # a split character waits for its last byte
        if params.get("skip_special_tokens", True):
            text = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        assert fast[-1] == text
