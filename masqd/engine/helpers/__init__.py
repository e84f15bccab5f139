"""Protocol helpers of the masquerade engine (IPsec, PPTP, ...), registered here."""

from __future__ import annotations

from masqd.engine.helpers.base import Helper

# Helper classes, in priority order. Each module appends itself here.
HELPERS: list[type[Helper]] = []


def _register() -> None:
    import importlib

    for name in ("ipsec", "pptp"):
        try:
            mod = importlib.import_module(f"masqd.engine.helpers.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"masqd.engine.helpers.{name}":
                raise
            continue
        cls = getattr(mod, "HELPER", None)
        if cls is not None and cls not in HELPERS:
            HELPERS.append(cls)


_register()

__all__ = ["HELPERS", "Helper"]
