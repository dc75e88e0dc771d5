from hw_plugins.torch_ref.plugin import TorchPlugin

__all__ = ["TorchPlugin"]
