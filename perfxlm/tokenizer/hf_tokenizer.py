"""HFTokenizer: the part of transformers' fast tokenizer API the engine and the server call,
over a TokenizerPipeline read from an HF tokenizer directory."""

import json
import logging
from pathlib import Path
from typing import Any

from perfxlm.tokenizer import chat_template as chat
from perfxlm.tokenizer.added_vocabulary import AddedToken
from perfxlm.tokenizer.models import BPE
from perfxlm.tokenizer.pipeline import TokenizerPipeline

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config gives none
# from_pretrained arguments that choose where files come from: meaningless for a local directory
_LOADING_KWARGS = ("trust_remote_code", "revision", "use_fast", "local_files_only", "cache_dir", "token",
                   "force_download", "subfolder", "_commit_hash")
# transformers' tokenizer classes whose model_input_names include token_type_ids (the
# others, and TokenizersBackend, return input_ids and attention_mask)
_TOKEN_TYPE_CLASSES = {"BertTokenizer", "ConvBertTokenizer", "SqueezeBertTokenizer", "MobileBertTokenizer",
                       "ElectraTokenizer", "LayoutLMTokenizer", "LxmertTokenizer", "DPRContextEncoderTokenizer",
                       "DPRQuestionEncoderTokenizer", "DebertaTokenizer", "DebertaV2Tokenizer", "CanineTokenizer",
                       "FNetTokenizer", "LayoutLMv2Tokenizer", "MarkupLMTokenizer", "TapasTokenizer"}
# encode arguments whose effect is not implemented here (so they fail rather than being ignored)
_UNSUPPORTED_CALL_KWARGS = ("return_tensors", "padding", "return_offsets_mapping", "is_split_into_words",
                            "return_overflowing_tokens", "stride", "pad_to_multiple_of")


def _token(value: Any) -> AddedToken | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if value is None or isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, normalized=False, special=True)
    if isinstance(value, dict) and "content" in value:
        return AddedToken.from_json({k: v for k, v in value.items() if k != "__type"})
    raise TypeError(f"a special token must be a string or an AddedToken dict, not {value!r}")


class HFTokenizer:
    """A tokenizer with transformers' fast-tokenizer API, from tokenizer.json and its config
    files, needing neither `tokenizers` nor `transformers`.

    Encodes and decodes as transformers' TokenizersBackend does with the same files (the
    tokenizer.json pipeline as written; transformers 5's model-specific classes that
    rebuild their pipeline from the vocabulary are not imitated)."""

    def __init__(self, pipeline: TokenizerPipeline, config: dict[str, Any], name_or_path: str = "") -> None:
        config = dict(config)
        self.pipeline = pipeline
        self.name_or_path = name_or_path
        max_length = config.pop("model_max_length", config.pop("max_len", None))
        self.model_max_length = VERY_LARGE_INTEGER if max_length is None else max_length
        self.padding_side = config.pop("padding_side", "right")
        self.truncation_side = config.pop("truncation_side", "right")
        for name, side in (("Padding", self.padding_side), ("Truncation", self.truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} side should be selected between 'right' and 'left', current value: {side}")
        self.model_input_names = list(config.pop("model_input_names", ["input_ids", "attention_mask"]))
        self.clean_up_tokenization_spaces = bool(config.pop("clean_up_tokenization_spaces", False))
        self._clean_up_bpe = bool(config.pop("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                             False))
        self.split_special_tokens = bool(config.pop("split_special_tokens", False))
        template = config.pop("chat_template", None)
        if isinstance(template, (list, tuple)):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        self.chat_template: str | dict[str, str] | None = template

        # named special tokens, the standard ones then any other '<name>_token' string
        self.special_attributes = list(SPECIAL_TOKENS_ATTRIBUTES)
        self._special: dict[str, AddedToken] = {}
        for key in list(config):
            value = config[key]
            if key in SPECIAL_TOKENS_ATTRIBUTES or (key.endswith("_token") and isinstance(value, (str, dict))):
                config.pop(key)
                if key not in self.special_attributes:
                    self.special_attributes.append(key)
                if value is not None:
                    self._special[key] = _token(value)
        extra = config.pop("extra_special_tokens", None) or config.pop("additional_special_tokens", None) or []
        if isinstance(extra, dict):  # named extras: like the '<name>_token' keys above
            for key, value in extra.items():
                self.special_attributes.append(key)
                self._special[key] = _token(value)
            extra = []
        self._extra: list[AddedToken] = [_token(t) for t in extra]
        self._add_missing_tokens(config.pop("added_tokens_decoder", {}))

    def _add_missing_tokens(self, added_tokens_decoder: dict[str, Any]) -> None:
        """Added tokens the config lists and special tokens it names that tokenizer.json lacks
        are added, as transformers does on load."""
        added = self.pipeline.added
        to_add = []
        for _, spec in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
            tok = _token(spec)
            if added.tokens.get(added.ids.get(tok.content, -1)) != tok:
                to_add.append(tok)
        named = {t.content for t in self._special.values()}
        for tok in [*self._special.values(), *self._extra]:
            if tok.content not in added.ids and tok not in to_add:
                to_add.append(tok)
        for tok in to_add:
            if not tok.special and tok.content in named:
                tok.special = True
        if to_add:
            self.pipeline.add_tokens(to_add)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> "HFTokenizer":
        """Read tokenizer.json, tokenizer_config.json, special_tokens_map.json and the chat
        template files (chat_template.jinja, additional_chat_templates/) of an HF directory;
        kwargs override the config's values."""
        path = Path(directory)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json: without the `transformers` package only "
                                    f"tokenizer.json tokenizers can be loaded")
        pipeline = TokenizerPipeline.from_file(path / "tokenizer.json")
        config = _read_json(path / "tokenizer_config.json")
        has_config = config is not None
        config = config or {}
        if (config.pop("tokenizer_class", None) or "").removesuffix("Fast") in _TOKEN_TYPE_CLASSES:
            config.setdefault("model_input_names", ["input_ids", "token_type_ids", "attention_mask"])
        # with a tokenizer.json, transformers ignores these and keeps the file's post-processor
        config.pop("add_bos_token", None)
        config.pop("add_eos_token", None)
        templates = {}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        for f in sorted((path / "additional_chat_templates").glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
        if "added_tokens_decoder" not in config:  # an older directory: special_tokens_map.json names them
            for key, value in (_read_json(path / "special_tokens_map.json") or {}).items():
                if key not in kwargs or not kwargs[key]:
                    config[key] = value
        for key in _LOADING_KWARGS:
            kwargs.pop(key, None)
        config.update(kwargs)
        tokenizer = cls(pipeline, config, name_or_path=str(directory))
        if not has_config:
            tokenizer._special_tokens_from_generation_config(path)
        return tokenizer

    def _special_tokens_from_generation_config(self, path: Path) -> None:
        """With no tokenizer_config.json, BOS and EOS from generation_config.json's ids."""
        gen = _read_json(path / "generation_config.json") or {}
        for key in ("bos_token", "eos_token"):
            ids = gen.get(f"{key}_id")
            token_id = ids[0] if isinstance(ids, list) and ids else ids
            if key not in self._special and isinstance(token_id, int):
                token = self.pipeline.id_to_token(token_id)
                if token is not None:
                    logger.info("%s: %s %r from generation_config.json", path, key, token)
                    self._special[key] = AddedToken(token, normalized=False, special=True)

    # ---- special tokens -------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """bos_token, eos_token_id, ...: a named special token's text, or with `_id` its id (None if unset)."""
        key = name.removesuffix("_id")
        if key in self.__dict__.get("special_attributes", ()):
            tok = self._special.get(key)
            if tok is None:
                return None
            return self.convert_tokens_to_ids(tok.content) if name != key else tok.content
        raise AttributeError(f"{type(self).__name__} has no attribute {name}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: self._special[k].content for k in self.special_attributes if k in self._special}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [t.content for t in self._extra]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.pipeline.num_special_tokens_to_add(pair)

    # ---- vocabulary -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary, without added tokens."""
        return self.pipeline.vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.pipeline.vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.pipeline.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self.pipeline.added.tokens.items()))

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.added_tokens_decoder.items()}

    added_tokens_encoder = property(get_added_vocab)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            token_id = self.pipeline.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | None | list:
        if isinstance(ids, int) or hasattr(ids, "__index__"):  # numpy integers too
            return self.pipeline.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.pipeline.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.pipeline.decode_tokens(tokens)

    # ---- encode ---------------------------------------------------------------------

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True,
               **kwargs: Any) -> list[int]:
        """text (and a second text) -> token ids."""
        return self._encode(text, text_pair, add_special_tokens, **kwargs)[0]

    def __call__(self, text: str | list[str], text_pair: str | list[str] | None = None,
                 add_special_tokens: bool = True, return_attention_mask: bool | None = None,
                 return_token_type_ids: bool | None = None, **kwargs: Any) -> dict[str, list]:
        """{"input_ids", "attention_mask"} (and "token_type_ids" where the model takes them) for
        one text or a batch (lists of lists)."""
        if isinstance(text, (list, tuple)):
            pairs = text_pair if text_pair is not None else [None] * len(text)
            if isinstance(pairs, str) or len(pairs) != len(text):
                raise ValueError(f"batch length of `text`: {len(text)} does not match batch length of "
                                 f"`text_pair`: {1 if isinstance(pairs, str) else len(pairs)}.")
            rows = [self.__call__(t, p, add_special_tokens, return_attention_mask, return_token_type_ids, **kwargs)
                    for t, p in zip(text, pairs)]
            return {k: [r[k] for r in rows] for k in rows[0]} if rows else {"input_ids": []}
        ids, type_ids = self._encode(text, text_pair, add_special_tokens, **kwargs)
        out: dict[str, list] = {"input_ids": ids}
        if return_token_type_ids or (return_token_type_ids is None and "token_type_ids" in self.model_input_names):
            out["token_type_ids"] = type_ids
        if return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
            out["attention_mask"] = [1] * len(ids)
        return out

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The tokens' strings (an added token's as its content, without the whitespace an
        lstrip/rstrip token swallowed, which transformers' tokens include)."""
        return self.convert_ids_to_tokens(self.encode(text, pair, add_special_tokens=add_special_tokens))

    def _encode(self, text: str, pair: str | None, add_special_tokens: bool, truncation: bool | str | None = None,
                max_length: int | None = None, split_special_tokens: bool | None = None,
                **kwargs: Any) -> tuple[list[int], list[int]]:
        for key in _UNSUPPORTED_CALL_KWARGS:
            if kwargs.get(key):
                raise NotImplementedError(f"perfxlm's tokenizer (no `tokenizers` package): {key}={kwargs[key]!r}")
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise ValueError("text input must be of type `str` (single example), `list[str]` (batch or single "
                             "pretokenized example) or `list[list[str]]` (batch of pretokenized examples) or "
                             "`list[tuple[list[str], list[str]]]` (batch of pretokenized sequence pairs).")
        pipeline = self.pipeline
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        # as transformers: a max_length alone also truncates
        if truncation in (False, "do_not_truncate") or (truncation is None and max_length is None):
            enc = pipeline.encode(text, pair, add_special_tokens, split)
            return enc.ids, enc.type_ids
        if pair is not None:
            raise NotImplementedError("perfxlm's tokenizer (no `tokenizers` package): truncating a pair")
        limit = self.model_max_length if max_length is None else max_length
        limit = max(limit - (pipeline.num_special_tokens_to_add(False) if add_special_tokens else 0), 0)
        ids = pipeline.encode_plain(text, split)
        if len(ids) > limit:
            ids = ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit:]
        enc = pipeline.post_process([ids], add_special_tokens)
        return enc.ids, enc.type_ids

    # ---- decode ---------------------------------------------------------------------

    def decode(self, token_ids: int | list[int] | list[list[int]], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str | list[str]:
        """ids -> text (a list of id lists -> a list of texts)."""
        if hasattr(token_ids, "tolist"):  # numpy / torch
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in token_ids]
        text = self.pipeline.decode([int(i) for i in token_ids], skip_special_tokens)
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        # transformers skips its cleanup for BPE models: it would eat spaces before punctuation
        if cleanup and (not isinstance(self.pipeline.model, BPE) or self._clean_up_bpe):
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens, **kwargs) for s in sequences]

    # ---- chat -----------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """The template to render: the argument (a template, or a name of one), else the tokenizer's."""
        if isinstance(self.chat_template, dict):
            templates = self.chat_template
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError("This model has multiple chat templates with no default specified! Please either "
                                 "pass a chat template or the name of the template you wish to use to the "
                                 f"`chat_template` argument. Available template names are {sorted(templates)}.")
        elif chat_template is None:
            if self.chat_template is None:
                raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and "
                                 "no template argument was passed! For information about writing templates and "
                                 "setting the tokenizer.chat_template attribute, please see the documentation at "
                                 "https://huggingface.co/docs/transformers/main/en/chat_templating")
            return self.chat_template
        return chat_template

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, return_dict: bool = True,
                            tokenizer_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Render the conversation with the chat template (jinja2, as transformers renders it);
        with tokenize, encode it without adding special tokens (the template writes them)."""
        for key in ("return_assistant_tokens_mask", "sanitize_control_tokens", "return_tensors", "padding"):
            if kwargs.get(key):
                raise NotImplementedError(f"perfxlm's tokenizer (no `transformers` package): {key}={kwargs[key]!r}")
            kwargs.pop(key, None)
        truncation, max_length = kwargs.pop("truncation", False), kwargs.pop("max_length", None)
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        variables = {**self.special_tokens_map, **kwargs}
        rendered = [chat.render(template, c, tools, documents, add_generation_prompt, continue_final_message,
                                **variables) for c in (conversation if batched else [conversation])]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], add_special_tokens=False, truncation=truncation,
                   max_length=max_length, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: spaces before punctuation and contractions removed."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
