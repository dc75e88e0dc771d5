from hw_plugins.cuda.plugin import CudaPlugin, DcuPlugin

__all__ = ["CudaPlugin", "DcuPlugin"]
