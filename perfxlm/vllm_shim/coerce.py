"""vLLM's own SamplingParams (a msgspec Struct, from a real `vllm` install) -> perfxlm's, field by
field, so `LLM.generate` can take the objects a vLLM script builds without the alias."""

import dataclasses
import enum
from typing import Any

from perfxlm import sampling_params as ours
from perfxlm.sampling_params import SamplingParams

# Set by SamplingParams itself (post-init or the engine), never by the caller: not copied.
_DERIVED = frozenset({"output_text_buffer_length"})
_MISSING = object()


def coerce_sampling_params(obj: Any) -> SamplingParams:
    """Return `obj` if it is perfxlm's SamplingParams, else a perfxlm SamplingParams with the
    same settings built from vLLM's fields (a msgspec Struct or a dataclass named
    SamplingParams). Enums and nested parameter classes are matched by class name
    (RequestOutputKind, StructuredOutputsParams). A vLLM field perfxlm lacks is dropped when it
    holds its default and refused otherwise (NotImplementedError naming it and its value); the
    values then go through perfxlm's own validation, with vLLM's messages."""
    if isinstance(obj, SamplingParams):
        return obj
    if type(obj).__name__ != "SamplingParams":
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(obj).__module__}."
                        f"{type(obj).__qualname__}")
    accepted = {f.name for f in dataclasses.fields(SamplingParams) if f.init} - _DERIVED
    kwargs = {}
    for name, default in _declared_fields(obj).items():
        if name.startswith("_") or name in _DERIVED:
            continue
        value = getattr(obj, name)
        if name in accepted:
            kwargs[name] = _convert(value)
        elif default is _MISSING or value != default:
            raise NotImplementedError(f"perfxlm does not support SamplingParams.{name} (got {value!r})")
    return SamplingParams(**kwargs)


def _declared_fields(obj: Any) -> dict[str, Any]:
    """Field name -> default (or _MISSING) of a msgspec Struct or a dataclass instance."""
    cls = type(obj)
    if hasattr(cls, "__struct_fields__"):  # msgspec.Struct; msgspec is importable since obj is one
        import msgspec
        return {f.name: (f.default if f.default is not msgspec.NODEFAULT else
                         f.default_factory() if f.default_factory is not msgspec.NODEFAULT else _MISSING)
                for f in msgspec.structs.fields(cls)}
    if dataclasses.is_dataclass(obj):
        return {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else _MISSING)
                for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot read the fields of {cls.__module__}.{cls.__qualname__}: "
                    "expected vLLM's SamplingParams (a msgspec Struct)")


def _convert(value: Any) -> Any:
    """A vLLM enum member or parameter object -> perfxlm's class of the same name; else unchanged."""
    counterpart = getattr(ours, type(value).__name__, None)
    if counterpart is None or isinstance(value, counterpart):
        return value
    if isinstance(value, enum.Enum) and issubclass(counterpart, enum.Enum):
        return counterpart[value.name]
    if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(counterpart):
        fields = {f.name for f in dataclasses.fields(counterpart) if f.init}
        return counterpart(**{f.name: _convert(getattr(value, f.name)) for f in dataclasses.fields(value)
                              if f.init and f.name in fields})
    return value
