"""Hardware plugins: each runs graph ops on one kind of device (see base.py)."""

from hw_plugins.base import HwPlugin, available_plugins, discover_plugins, select_plugin

__all__ = ["HwPlugin", "available_plugins", "discover_plugins", "select_plugin"]
