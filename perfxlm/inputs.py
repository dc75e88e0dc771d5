"""Prompt forms that `LLM.generate` accepts, with vLLM's names."""

from typing import Any, NotRequired, TypedDict

from perfxlm.exceptions import VLLMValidationError


class TextPrompt(TypedDict):
    """A text prompt, tokenized with the model's tokenizer."""

    prompt: str
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """A prompt given as token ids, used as is. `prompt` is only echoed back."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


SingletonPrompt = str | TextPrompt | TokensPrompt
PromptType = SingletonPrompt | list[int]



def tokenize_prompt(prompt: Any, tokenizer: Any,
                    tokenization_kwargs: dict[str, Any] | None = None) -> tuple[list[int], str | None]:
    """One prompt (a str, TextPrompt, TokensPrompt or list of token ids) -> (token ids, its text
    or None). Token ids are checked later, against the vocabulary, by the engine."""
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if isinstance(prompt, list):
        return list(prompt), None
    if not isinstance(prompt, dict):
        raise VLLMValidationError(f"Invalid prompt {prompt!r}: expected a str, a TextPrompt, a "
                                  "TokensPrompt or a list of token ids")
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"]), prompt.get("prompt")
    if "prompt" not in prompt:
        raise VLLMValidationError(f"Invalid prompt {prompt!r}: a dict needs 'prompt' or 'prompt_token_ids'")
    text = prompt["prompt"]
    if not isinstance(text, str):
        raise VLLMValidationError(f"Invalid prompt {text!r}: the text of a prompt must be a str, got "
                                  f"{type(text).__name__}", parameter="prompt", value=text)
    check_text(text, "prompt")
    if tokenizer is None:
        raise ValueError("A text prompt needs a tokenizer, but the engine was built with skip_tokenizer_init=True")
    return tokenizer.encode(text, **(tokenization_kwargs or {})), text


def check_text(text: str, what: str) -> None:
    """Text the tokenizer can take: a lone surrogate (e.g. from a bad decode) is not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = repr(text) if len(text) <= 200 else repr(text[:200]) + "..."
        raise VLLMValidationError(
            f"Invalid {what} {shown}: it is not valid Unicode text ({e.reason}: {text[e.start:e.end]!r} at "
            f"position {e.start}); pass a str that encodes to UTF-8", parameter="prompt", value=text) from None


__all__ = ["TextPrompt", "TokensPrompt", "PromptType", "SingletonPrompt", "tokenize_prompt"]
