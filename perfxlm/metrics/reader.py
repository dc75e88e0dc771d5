"""`LLM.get_metrics()`: the `vllm:` families of prometheus_client's default registry as vLLM
0.32's v1/metrics/reader.py returns them: `Counter`, `Gauge`, `Histogram` and `Vector`
dataclasses, one per family and label set."""

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

# the counter vLLM reports as a Vector: one count per speculative-decoding position
_VECTOR_COUNTERS = {"vllm:spec_decode_num_accepted_tokens_per_pos": "position"}


@dataclass
class Metric:
    """A metric; one family may give several, one per set of key=value labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A monotonically increasing integer counter."""

    value: int


@dataclass
class Vector(Metric):
    """An ordered array of integer counters (a counter labelled by position, read as a list)."""

    values: list[int]


@dataclass
class Gauge(Metric):
    """A numerical value that can go up or down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations in buckets: `buckets` maps each bucket's upper bound (the `le` label, '+Inf'
    included) to its cumulative count; `count` equals the '+Inf' bucket; `sum` is the total."""

    count: int
    sum: float
    buckets: dict[str, int]


def get_metrics_snapshot(registry: Any = None) -> list[Metric]:
    """Every `vllm:` metric in `registry` (prometheus_client's default REGISTRY when None)."""
    if registry is None:
        from prometheus_client import REGISTRY  # imported here: `import perfxlm` stays cheap
        registry = REGISTRY
    collected: list[Metric] = []
    for family in registry.collect():
        if not family.name.startswith("vllm:"):
            continue
        if family.type == "gauge":
            collected += [Gauge(family.name, s.labels, s.value) for s in _samples(family, "")]
        elif family.type == "counter":
            samples = _samples(family, "_total")
            if family.name in _VECTOR_COUNTERS:
                collected += _vectors(family.name, samples, _VECTOR_COUNTERS[family.name])
            else:
                collected += [Counter(family.name, s.labels, int(s.value)) for s in samples]
        elif family.type == "histogram":
            collected += _histograms(family)
        else:
            raise AssertionError(f"Unknown metric type {family.type}")
    return collected


def _samples(family: Any, suffix: str) -> list[Any]:
    return [s for s in family.samples if s.name == family.name + suffix]


def _key(labels: dict[str, str], drop: str | None = None) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in labels.items() if k != drop)


def _histograms(family: Any) -> list[Histogram]:
    buckets: dict[frozenset, dict[str, int]] = defaultdict(dict)
    for s in _samples(family, "_bucket"):
        buckets[_key(s.labels, "le")][s.labels["le"]] = int(s.value)
    counts = {_key(s.labels): int(s.value) for s in _samples(family, "_count")}
    sums = {_key(s.labels): s.value for s in _samples(family, "_sum")}
    assert set(buckets) == set(counts) == set(sums), f"{family.name}: bucket, count and sum label sets differ"
    return [Histogram(family.name, dict(key), counts[key], sums[key], by_le) for key, by_le in buckets.items()]


def _vectors(name: str, samples: list[Any], position_label: str) -> list[Vector]:
    by_labels: dict[frozenset, dict[int, int]] = defaultdict(dict)
    for s in samples:
        by_labels[_key(s.labels, position_label)][int(s.labels[position_label])] = int(s.value)
    length = 1 + max((p for values in by_labels.values() for p in values), default=0)
    out = []
    for key, by_pos in by_labels.items():
        values = [0] * length
        for pos, value in by_pos.items():
            values[pos] = value
        out.append(Vector(name, dict(key), values))
    return out
