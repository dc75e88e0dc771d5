"""Incremental detokenisation and stop strings, as vLLM's output processor does them."""

import logging
import sys
from typing import Any

from perfxlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# prompt tokens decoded along with the first output tokens, so that a word
# continuing the prompt gets its leading space right (sentencepiece vocabularies)
_PROMPT_CONTEXT = 5
# what tokenizers' DecodeStream raises when a token makes the text so far non-monotonic
# (vLLM issue 17448); vLLM then restarts the stream at that token, and so do we
_INVALID_PREFIX = "Invalid prefix encountered"


def _rust_backend(tokenizer: Any) -> Any:
    """The tokenizers library's Tokenizer behind a fast HF tokenizer, else None. `tokenizers` is
    optional (perfxlm.tokenizer reads tokenizer.json without it): a tokenizer can only be
    backed by it once something has imported it."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or "tokenizers" not in sys.modules:
        return None
    from tokenizers import Tokenizer
    return backend if isinstance(backend, Tokenizer) else None


class IncrementalDetokenizer:
    """Turns one completion's tokens into text a few tokens at a time.

    With a fast (Rust) tokenizer, as vLLM's FastIncrementalDetokenizer: the tokenizers
    library's DecodeStream, primed with a prompt suffix that decodes cleanly, one call a
    token. Otherwise each step decodes only a short window: the tokens since the last
    complete character plus a little context, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.output_text = ""
        self.num_output_tokens = 0
        self.backend = _rust_backend(tokenizer)
        if self.backend is not None:
            self._start_stream(prompt_token_ids)
        else:
            self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
            self.prefix_offset = 0            # window start
            self.read_offset = len(self.ids)  # tokens before this are already in output_text

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Add tokens; return the stop string that ended the completion, if any.

        stop_terminated: the last token is an EOS / stop token id, whose text is
        left out unless include_stop_str_in_output.
        """
        if not self.params.detokenize:
            return None
        skip_last = stop_terminated and not self.params.include_stop_str_in_output
        decode_ids = new_token_ids[:-1] if skip_last else new_token_ids
        new_chars = 0
        for token_id in decode_ids:
            piece = self._stream_next(token_id) if self.backend is not None else self._window_next(token_id)
            self.output_text += piece
            new_chars += len(piece)
        self.num_output_tokens += len(new_token_ids)
        if not self.params.stop or self.num_output_tokens <= self.params.min_tokens:
            return None
        hit = check_stop_strings(self.output_text, new_chars, self.params.stop,
                                 self.params.include_stop_str_in_output)
        if hit is None:
            return None
        stop_str, truncate_to = hit
        if truncate_to != -1:
            self.output_text = self.output_text[:truncate_to]
        return stop_str

    # ---- fast tokenizers: DecodeStream --------------------------------------------

    def _start_stream(self, prompt_token_ids: list[int]) -> None:
        from tokenizers.decoders import DecodeStream
        params = self.params
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        suffix = prompt_token_ids
        if len(suffix) > 4:  # the shortest suffix of 4..23 tokens with no split character
            for i in range(4, min(len(suffix) + 1, 24)):
                if "\ufffd" not in self.backend.decode(prompt_token_ids[-i:]):
                    suffix = prompt_token_ids[-i:]
                    break
        for token_id in suffix:
            self._step(token_id)
        # special tokens kept in the text, without spaces between them: a special token after
        # another is its raw content (DecodeStream would put a space before it)
        self.added: dict[int, str] = {}
        if not (params.skip_special_tokens or params.spaces_between_special_tokens):
            self.added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        self.last_special = False

    def _stream_next(self, token_id: int) -> str:
        piece = self._step(token_id)
        if self.added:
            special = self.added.get(token_id)
            if special is not None and self.last_special:
                piece = special
            self.last_special = special is not None
        return piece or ""

    def _step(self, token_id: int) -> str | None:
        try:
            return self.stream.step(self.backend, token_id)
        except Exception as e:
            if str(e) != _INVALID_PREFIX:
                raise
            logger.warning("detokenizer: invalid prefix at token %d, restarting the decode stream", token_id)
            self.stream = DecodeStream(skip_special_tokens=self.params.skip_special_tokens)
            return self.stream.step(self.backend, token_id)

    # ---- other tokenizers: a sliding window ---------------------------------------

    def _window_next(self, token_id: int) -> str:
        self.ids.append(token_id)
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            # a complete character: emit it and slide the window
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""  # an incomplete UTF-8 sequence so far: wait for the next byte token


def check_stop_strings(text: str, new_chars: int, stop: list[str], include: bool) -> tuple[str, int] | None:
    """The first stop string in the new part of text -> (it, where to cut text, or -1 for no cut)."""
    if not new_chars:
        return None
    for s in stop:
        # search only where a match could involve the new characters
        i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if i == -1:
            continue
        if include:
            i += len(s)
            if i >= len(text):
                return s, -1
        return s, i
    return None
