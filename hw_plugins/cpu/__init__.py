from hw_plugins.cpu.plugin import CpuPlugin, RvvPlugin

__all__ = ["CpuPlugin", "RvvPlugin"]
