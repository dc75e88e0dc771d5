"""Structured outputs on xgrammar, as vLLM's v1/structured_output with its xgrammar backend.

A request's `StructuredOutputsParams` is validated when it is added (vLLM's messages), its
grammar compiled once per distinct spec (kind + spec text) by a `GrammarCompiler` built from
the tokenizer, and each of its sequences gets its own `GrammarMatcher` (`RequestGrammar`).
Each step the sampler masks, through one token bitmask, only the logits rows of sequences
whose grammar has not terminated; the scheduler feeds each sampled token to the matcher.
The grammar's stop tokens are the request's (EOS and stop_token_ids): once the grammar is
complete only they are allowed, so the request ends with finish_reason "stop".
"""

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from perfxlm.exceptions import VLLMValidationError
from perfxlm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")  # vLLM's choices
SUPPORTED_BACKENDS = ("auto", "xgrammar")  # "auto" is xgrammar here: the others are not installed
MAX_JSON_NESTING = 64          # vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING
STRUCTURAL_TAG_NESTING = 16    # vLLM's STRUCTURAL_TAG_WRAPPER_NESTING, on top of the above
_CACHED_GRAMMARS = 256         # compiled grammars kept (least recently used dropped)
# JSON-schema string formats xgrammar implements (vLLM's STRING_SUPPORTED_FORMATS)
_XGRAMMAR_FORMATS = {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                     "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}


@dataclass
class StructuredOutputsConfig:
    """vLLM's engine-wide structured outputs settings (`LLM(structured_outputs_config=...)`).

    perfxlm runs the xgrammar backend ("auto" picks it); naming another backend, or a
    reasoning parser, is refused."""

    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str = ""
    reasoning_parser_plugin: str = ""
    enable_in_reasoning: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"structured_outputs_config.backend must be one of {', '.join(map(repr, BACKENDS))}, "
                             f"got {self.backend!r}")
        if self.backend not in SUPPORTED_BACKENDS:
            raise NotImplementedError(f"perfxlm: structured outputs backend {self.backend!r} is not supported; "
                                      "use 'xgrammar' (or 'auto', which picks it)")
        if self.disable_any_whitespace and self.backend not in ("xgrammar", "guidance"):
            raise ValueError("disable_any_whitespace is only supported for xgrammar and guidance backends.")
        if self.disable_additional_properties and self.backend != "guidance":
            raise ValueError("disable_additional_properties is only supported for the guidance backend.")
        if self.reasoning_parser or self.reasoning_parser_plugin:
            raise NotImplementedError("perfxlm: structured outputs with a reasoning parser are not supported "
                                      f"(reasoning_parser={self.reasoning_parser!r})")

    @classmethod
    def coerce(cls, value: "StructuredOutputsConfig | dict[str, Any] | None") -> "StructuredOutputsConfig":
        """The config from what LLM() / EngineArgs take: None (defaults), a dict or the object."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"structured_outputs_config must be a dict or StructuredOutputsConfig, got "
                        f"{type(value).__name__}")


class RequestGrammar:
    """One sequence's grammar state: an xgrammar GrammarMatcher fed every sampled token."""

    __slots__ = ("matcher", "terminated", "num_accepted")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.terminated = False   # the grammar accepted a stop token: later tokens are not its business
        self.num_accepted = 0

    def accept(self, token: int) -> bool:
        """Advance on a sampled token; False if the grammar rejects it (vLLM: the request errors)."""
        if self.terminated:
            return True
        if not self.matcher.accept_token(token):
            return False
        self.num_accepted += 1
        self.terminated = self.matcher.is_terminated()
        return True

    def fill_bitmask(self, bitmask: Any, row: int) -> None:  # a torch.Tensor (xgrammar's)
        self.matcher.fill_next_token_bitmask(bitmask, row)


class GrammarBitmask:
    """Masks the logits rows of sequences with a live grammar, in place; other rows are not
    touched. The bitmask buffer (rows, ceil(vocab / 32)) int32 grows to the largest batch seen."""

    def __init__(self) -> None:
        self._buf: Any = None  # a torch.Tensor (xgrammar's)

    def apply(self, logits: np.ndarray, reqs: list[Any]) -> None:
        """logits (B, V) float32 (C-contiguous); reqs[i] (with a `grammar`: RequestGrammar | None)
        samples row i."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.grammar.terminated]
        if not rows:
            return
        import xgrammar as xgr  # a second and a half to import: only once a grammar is in use
        B, V = logits.shape
        if self._buf is None or self._buf.shape[0] < B or self._buf.shape[1] * 32 < V:
            self._buf = xgr.allocate_token_bitmask(max(B, 8), V)
        for i in rows:
            reqs[i].grammar.fill_bitmask(self._buf, i)
        import torch  # xgrammar needs it; validate() refused grammars where it is missing
        xgr.apply_token_bitmask_inplace(torch.from_numpy(logits), self._buf[:B], vocab_size=V,
                                        indices=None if len(rows) == B else rows)


class StructuredOutputManager:
    """Validates structured outputs requests, compiles their grammars (cached by kind + spec)
    and gives each sequence its matcher. Thread-safe: AsyncLLM builds requests on callers'
    threads."""

    def __init__(self, config: StructuredOutputsConfig, tokenizer: Any, vocab_size: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size   # the model's: logits rows are this wide
        self._compiler: Any = None     # built on first use (the tokenizer's vocabulary is scanned)
        self._grammars: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def validate(self, params: SamplingParams) -> None:
        """Raise VLLMValidationError (vLLM's messages) for a constraint that cannot be compiled."""
        so = params.structured_outputs
        if so is None:
            return
        if self.tokenizer is None:
            raise VLLMValidationError("Structured outputs requires a tokenizer so it can't be used with "
                                      "'skip_tokenizer_init'")
        if isinstance(so.choice, list) and not so.choice:
            raise VLLMValidationError(f"Choice '{so.choice}' cannot be an empty list")
        for name in ("grammar", "json", "structural_tag"):
            value = getattr(so, name)
            if isinstance(value, str) and value.strip() == "":
                raise VLLMValidationError(f"structured_outputs.{name} cannot be an empty string")
        check_json_nesting(so.json)
        check_json_nesting(so.structural_tag, structural_tag=True)
        if so.json_object is False:
            raise VLLMValidationError("structured_outputs.json_object must be True if set; omit "
                                      "structured_outputs to disable structured outputs")
        if so.regex and "\x00" in so.regex:
            raise VLLMValidationError("structured_outputs.regex must not contain a NUL character ('\\x00')")
        require_xgrammar()
        validate_xgrammar_grammar(so)

    def compile(self, so: StructuredOutputsParams) -> Any:
        """The xgrammar CompiledGrammar for a validated constraint, compiled once per spec."""
        key = structured_output_key(so)
        with self._lock:
            compiled = self._grammars.get(key)
            if compiled is not None:
                self._grammars.move_to_end(key)
                return compiled
            compiled = self._compile(*key)
            self._grammars[key] = compiled
            if len(self._grammars) > _CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
            return compiled

    def new_grammar(self, compiled: Any, stop_token_ids: set[int]) -> RequestGrammar:
        """A fresh matcher for one sequence; the request's stop tokens end the grammar (vLLM)."""
        import xgrammar as xgr
        return RequestGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None))

    def _compile(self, kind: str, spec: str) -> Any:
        import xgrammar as xgr
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        compiler = self._compiler
        compact = self.config.disable_any_whitespace
        json_kwargs = {"any_whitespace": not compact, "separators": (",", ":") if compact else None}
        try:
            if kind == "json":
                return compiler.compile_json_schema(spec, **json_kwargs)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', **json_kwargs)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "choice":
                return compiler.compile_grammar(choice_as_grammar(json.loads(spec)))
            if kind == "grammar":
                return compiler.compile_lark(spec) if grammar_is_likely_lark(spec) else compiler.compile_grammar(spec)
            tag = json.loads(spec)  # structural_tag
            if "structures" in tag:  # the older form: begin / schema / end items and triggers
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                         for s in tag["structures"]]
                return compiler.compile_structural_tag(items, tag["triggers"])
            return compiler.compile_structural_tag(spec)
        except Exception as e:  # validation passed, so this is rare: fail the request, not the engine
            raise VLLMValidationError(f"Failed to compile the {kind} grammar: {e}") from e


def structured_output_key(so: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, spec): what a compiled grammar is cached under (vLLM's get_structured_output_key)."""
    if so.json is not None:
        return "json", so.json if isinstance(so.json, str) else json.dumps(so.json)
    if so.json_object:
        return "json_object", ""
    if so.regex is not None:
        return "regex", so.regex
    if so.choice is not None:
        return "choice", json.dumps(so.choice)
    if so.grammar is not None:
        return "grammar", so.grammar
    if so.structural_tag is not None:
        return "structural_tag", so.structural_tag
    raise ValueError("No valid structured output parameter found")


def require_xgrammar() -> None:
    """Refuse structured outputs where xgrammar (which needs torch) cannot be imported, as on a
    deployable directory served without PyTorch, naming what is missing."""
    try:
        import xgrammar  # noqa: F401
    except ImportError as e:
        raise VLLMValidationError(f"Structured outputs need the xgrammar package (and PyTorch), which cannot "
                                  f"be imported here: {e}. Install them (pip install xgrammar) or send the "
                                  "request without structured_outputs.") from None


def validate_xgrammar_grammar(so: StructuredOutputsParams) -> None:
    """vLLM's validate_xgrammar_grammar: parse the constraint without compiling it."""
    import xgrammar as xgr
    if so.regex:
        try:
            xgr.Grammar.from_regex(so.regex)
        except Exception as err:
            raise VLLMValidationError(f"Failed to transform regex into a grammar: {err}") from err
    if so.choice:
        try:
            xgr.Grammar.from_ebnf(choice_as_grammar(so.choice))
        except Exception as err:
            raise VLLMValidationError(f"Failed to transform choices into a grammar: {err}") from err
        return
    if so.json:
        if isinstance(so.json, str):
            try:
                schema = json.loads(so.json)
            except json.JSONDecodeError as e:
                raise VLLMValidationError("Invalid JSON grammar specification.") from e
        else:
            schema = so.json
        if has_xgrammar_unsupported_json_features(schema):
            raise VLLMValidationError("The provided JSON schema contains features not supported by xgrammar.")
        try:
            xgr.Grammar.from_json_schema(schema if isinstance(schema, str) else json.dumps(schema))
        except Exception as err:
            raise VLLMValidationError(f"Failed to transform json schema into a grammar: {err}") from err
        return
    if so.grammar:
        try:
            if grammar_is_likely_lark(so.grammar):
                xgr.Grammar.from_lark(so.grammar)
            else:
                xgr.Grammar.from_ebnf(so.grammar)
        except Exception as e:
            raise VLLMValidationError("Invalid grammar specification.") from e
        return
    if so.structural_tag:
        try:
            tag = json.loads(so.structural_tag)
            if "structures" in tag:
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                         for s in tag["structures"]]
                xgr.Grammar.from_structural_tag(items, tag["triggers"])
            else:
                xgr.Grammar.from_structural_tag(so.structural_tag)
        except Exception as e:
            raise VLLMValidationError("Invalid structural tag specification.") from e


def check_json_nesting(spec: str | dict[str, Any] | None, *, structural_tag: bool = False) -> None:
    """vLLM's limit on how deep objects and arrays may nest in a schema (or structural tag)."""
    limit = MAX_JSON_NESTING + (STRUCTURAL_TAG_NESTING if structural_tag else 0)
    if spec and _exceeds_json_nesting(spec, limit):
        raise VLLMValidationError("The JSON schema is nested too deeply: objects and arrays may nest at "
                                  f"most {MAX_JSON_NESTING} levels")


def _exceeds_json_nesting(spec: str | dict[str, Any], limit: int) -> bool:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except RecursionError:
            return True
        except ValueError:  # malformed JSON is reported by the backend's validation
            return False
    level: list[Any] = [spec]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def has_xgrammar_unsupported_json_features(schema: Any) -> bool:
    """JSON-schema keywords xgrammar would silently drop (vLLM refuses them rather than let
    output violate the schema)."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else {t for t in kind if isinstance(t, str)} \
        if isinstance(kind, list) else set()
    if types & {"integer", "number"} and "multipleOf" in schema:
        return True
    if "array" in types and any(k in schema for k in ("uniqueItems", "contains", "minContains", "maxContains")):
        return True
    if "string" in types and (("format" in schema and schema["format"] not in _XGRAMMAR_FORMATS)
                              or _pattern_with_length_bounds(schema)):
        return True
    if "object" in types:
        names, patterns = schema.get("propertyNames"), schema.get("patternProperties")
        if isinstance(names, dict) and _pattern_with_length_bounds(names):
            return True
        if "propertyNames" in schema and ("properties" in schema or "patternProperties" in schema
                                          or isinstance(schema.get("additionalProperties"), dict)
                                          or schema.get("unevaluatedProperties", True) is not True):
            return True
        if isinstance(patterns, dict) and ("properties" in schema or len(patterns) > 1):
            return True
    for value in schema.values():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict) and has_xgrammar_unsupported_json_features(v) for v in items):
            return True
    return False


def _pattern_with_length_bounds(schema: dict[str, Any]) -> bool:
    # xgrammar compiles the pattern or format and drops minLength / maxLength
    return ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema)


def grammar_is_likely_lark(grammar: str) -> bool:
    """vLLM's test: a grammar with no `::=` rule (comments aside) is Lark, else EBNF (GBNF)."""
    for line in grammar.split("\n"):
        line = line.split("#", 1)[0].split("//", 1)[0].strip()
        if "::=" in line:
            return False
    return True


def choice_as_grammar(choice: list[str]) -> str:
    """An EBNF grammar matching exactly one of the choices (vLLM's escaping)."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(escape(ch) for ch in c) + '"' for c in choice)
