"""The sans-IO masquerade engine: ``Engine(config).process(iface, packet, now)``."""

from masqd.engine.core import Engine

__all__ = ["Engine"]
