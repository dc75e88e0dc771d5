"""An out-of-tree perfxlm hw plugin, as a third-party wheel would ship it.

It runs Add and SiluMul in numpy on host buffers and lacks every other op, so the
engine must fall back to the reference plugin for those (and move data between them).
"""

import numpy as np

from hw_plugins.base import HwPlugin


class NumpyDemoPlugin(HwPlugin):
    name = "numpy_demo"
    priority = -10  # never the default choice
    api_version = 1

    def is_available(self) -> bool:
        return True

    def supports(self, op_type: str, dtypes: tuple[str, ...]) -> bool:
        return op_type in ("Add", "SiluMul") and all(d == "float32" for d in dtypes)

    def alloc(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def upload(self, array):
        return np.array(array)

    def download(self, buf):
        return buf

    def run(self, node, inputs, outputs) -> None:
        if node.op_type == "Add":
            np.add(inputs[0], inputs[1], out=outputs[0])
        else:
            gate, up = inputs
            np.multiply(gate / (1.0 + np.exp(-gate)), up, out=outputs[0])


class BrokenPlugin(HwPlugin):
    """A plugin whose hardware is absent: is_available() says so, with a reason."""

    name = "broken_demo"
    api_version = 1

    def is_available(self) -> bool:
        return False

    def unavailable_reason(self) -> str:
        return "no demo accelerator found (/dev/demo0 missing)"

    def supports(self, op_type, dtypes):
        return False

    def alloc(self, shape, dtype):
        raise RuntimeError

    upload = download = alloc

    def run(self, node, inputs, outputs):
        raise RuntimeError


class OldApiPlugin(NumpyDemoPlugin):
    """A plugin written against an interface this perfxlm no longer has: discovery skips it."""

    name = "old_demo"
    api_version = 0
