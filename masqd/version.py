"""What this masqd is and what it runs on: its version, and the build and host facts a bug report needs.

:func:`version` reads the installed package's metadata, falling back to
``masqd.__version__`` (a source tree run without installing). :func:`build_info`
gathers, for ``masqd version --json``: the Python, uvloop and dependency
versions, whether the native fast path (masqd/dataplane/_fastpath.c) was
built and imports, the kernel release and what its TUN driver supports,
asked with the TUNGETFEATURES ioctl on /dev/net/tun (nothing is created).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import re
import sys
from typing import Any

import masqd


def version() -> str:
    try:
        return md.version("masqd")
    except md.PackageNotFoundError:
        return masqd.__version__


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _dependencies() -> dict[str, str | None]:
    try:
        reqs = md.requires("masqd") or []
    except md.PackageNotFoundError:
        return {}
    names = [re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
    return {n: _dist_version(n) for n in names}


def native_fastpath() -> dict[str, Any]:
    """``built``: the compiled module is there; ``importable``: it loads (``error`` says why not)."""
    name = "masqd.dataplane._fastpath"
    spec = importlib.util.find_spec(name)
    out: dict[str, Any] = {"built": spec is not None and spec.origin is not None,
                           "path": spec.origin if spec is not None else None}
    try:
        importlib.import_module(name)
    except ImportError as exc:
        out.update(importable=False, error=str(exc))
    else:
        out["importable"] = True
    return out


def kernel() -> dict[str, Any]:
    from masqd.dataplane.device import TUN_DEVICE, tun_features

    out: dict[str, Any] = {"release": os.uname().release}
    try:
        out["tun_features"] = tun_features()
    except OSError as exc:
        out["tun_features"] = None
        out["tun_error"] = f"{TUN_DEVICE}: {exc.strerror or exc}"
    return out


def build_info() -> dict[str, Any]:
    return {
        "version": version(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "uvloop": _dist_version("uvloop"),
        "dependencies": _dependencies(),
        "native_fastpath": native_fastpath(),
        "kernel": kernel(),
    }


def describe(info: dict[str, Any]) -> str:
    """``masqd version`` without --json: the same facts, one per line."""
    nf = info["native_fastpath"]
    if nf["importable"]:
        native = f"native (built, imports: {nf['path']})"
    elif nf["built"]:
        native = f"python only: the native module is built but does not import ({nf.get('error')})"
    else:
        native = "python only: the native module was not built (no C compiler at install time?)"
    k = info["kernel"]
    feats = k["tun_features"]
    tun = (", ".join(f"{name} {'yes' if on else 'no'}" for name, on in feats.items()) if feats is not None
           else f"unknown ({k.get('tun_error')})")
    py = info["python"]
    return "\n".join([
        f"masqd {info['version']}",
        f"python {py['version']} ({py['implementation']}, {py['executable']})",
        f"uvloop {info['uvloop'] or 'missing'}",
        f"fast path: {native}",
        f"kernel {k['release']}; TUN: {tun}",
    ])
