"""A classifier's label count, read off its HF config (no torch: the entrypoints read it too)."""

from typing import Any


def num_labels(cfg: dict[str, Any]) -> int:
    """transformers' rule: the config's id2label entries, else num_labels, else 2."""
    return len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2)
