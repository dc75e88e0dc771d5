"""Export perfxlm models to a small ONNX op graph (see ops.py for the op set)."""

from graph_export.ops import DOMAIN, FORMAT_VERSION, OPS, OpSpec

__all__ = ["DOMAIN", "FORMAT_VERSION", "OPS", "OpSpec"]
