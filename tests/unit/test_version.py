"""``masqd --version`` and ``masqd version [--json]``: the package's version, the build's native fast
path state and the kernel's TUN features, checked against the real thing."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import masqd
from masqd.dataplane import device
from masqd.version import build_info, describe, version

ROOT = Path(__file__).resolve().parents[2]


def masqd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "masqd.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def pyproject_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_dash_dash_version() -> None:
    r = masqd_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"masqd {pyproject_version()}\n"


def test_fallback_without_package_metadata_is_the_same_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert version() == masqd.__version__ == pyproject_version()


def test_version_json() -> None:
    r = masqd_cli("version", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == pyproject_version()
    assert info["python"]["version"] == platform.python_version()
    assert info["python"]["implementation"] == platform.python_implementation()
    assert info["uvloop"] == md.version("uvloop")
    assert info["dependencies"]["pyroute2"] == md.version("pyroute2")
    assert info["kernel"]["release"] == os.uname().release
    try:
        from masqd.dataplane import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        expected = False
    else:
        expected = True
        assert info["native_fastpath"]["path"] == _fastpath.__file__
    assert info["native_fastpath"]["importable"] is expected
    assert set(info["kernel"]["tun_features"]) == {"vnet_hdr", "multi_queue", "napi", "napi_frags"}


def test_version_text_says_the_same() -> None:
    r = masqd_cli("version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"masqd {pyproject_version()}"
    assert lines[1].startswith(f"python {platform.python_version()} ")
    assert lines[2] == f"uvloop {md.version('uvloop')}"
    assert lines[4].startswith(f"kernel {os.uname().release}; TUN: vnet_hdr ")


def test_describe_a_build_without_the_native_module() -> None:
    info: dict[str, Any] = build_info()
    info["native_fastpath"] = {"built": False, "path": None, "importable": False, "error": "No module"}
    info["kernel"] = {"release": "6.1.0", "tun_features": None, "tun_error": "/dev/net/tun: No such file"}
    text = describe(info)
    assert "fast path: python only: the native module was not built" in text
    assert "kernel 6.1.0; TUN: unknown (/dev/net/tun: No such file)" in text


def test_tun_features_missing_device_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        device.tun_features(str(tmp_path / "no-tun"))


_OPEN = r"""
import fcntl, json, os, struct, sys
flags = int(sys.argv[1])
fd = os.open("/dev/net/tun", os.O_RDWR)
try:
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"probe0", flags))  # TUNSETIFF
except OSError as exc:
    print(json.dumps({"ok": False, "errno": exc.errno})); sys.exit(0)
ifr = fcntl.ioctl(fd, 0x800454D2, bytes(40))  # TUNGETIFF
print(json.dumps({"ok": True, "flags": struct.unpack_from("H", ifr, 16)[0]}))
"""


@pytest.mark.usefixtures("root")
def test_reported_features_match_what_the_kernel_accepts() -> None:
    """TUNGETFEATURES against the oracle: opening a real TUN device with each flag, in a throwaway
    namespace. A reported feature opens and sticks; an unreported one is refused (EINVAL)."""
    feats = device.tun_features()
    ns = f"t{os.getpid()}v"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for name, flag in (("vnet_hdr", device.IFF_VNET_HDR), ("multi_queue", device.IFF_MULTI_QUEUE),
                           ("napi", device.IFF_NAPI)):
            want = 0x0001 | 0x1000 | flag  # IFF_TUN | IFF_NO_PI | the feature
            r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _OPEN, str(want)],
                               capture_output=True, text=True, timeout=30)
            got = json.loads(r.stdout)
            if feats[name]:
                assert got["ok"] and got["flags"] & flag, (name, got)
            else:
                assert not got["ok"], (name, got)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
