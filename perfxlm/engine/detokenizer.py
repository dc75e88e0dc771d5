"""Incremental detokenisation and stop strings, as vLLM's output processor does them."""

from typing import Any

from perfxlm.sampling_params import SamplingParams

# prompt tokens decoded along with the first output tokens, so that a word
# continuing the prompt gets its leading space right (sentencepiece vocabularies)
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns one completion's tokens into text a few tokens at a time.

    Each step decodes only a short window: the tokens since the last complete
    character plus a little context, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0            # window start
        self.read_offset = len(self.ids)  # tokens before this are already in output_text
        self.output_text = ""
        self.num_output_tokens = 0

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
            self.ids.append(token_id)
            piece = self._decode_next()
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

    def _decode_next(self) -> str:
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
