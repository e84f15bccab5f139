"""deploy/masqd.service (and its netns drop-in) pass ``systemd-analyze verify``, say what the issue
asks of them, and every setting in them is explained in docs/systemd.md.

verify checks that ExecStart's binary exists: the shipped unit names /opt/masqd/bin/masqd (where
docs/systemd.md installs it), so the test renders it with this venv's masqd into a temporary unit
directory, which also holds the drop-in (SYSTEMD_UNIT_PATH makes verify read it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "masqd.service"
DROPIN = ROOT / "deploy" / "masqd-netns.conf"
DOC = ROOT / "docs" / "systemd.md"
MASQD = Path(sys.executable).parent / "masqd"



@pytest.fixture(autouse=True)
def _systemd_analyze() -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/setup installs the systemd package"


def settings(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


def verify(tmp_path: Path, unit_text: str, dropin: str | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "masqd.service").write_text(unit_text)
    if dropin is not None:
        (tmp_path / "masqd.service.d").mkdir()
        (tmp_path / "masqd.service.d" / "netns.conf").write_text(dropin)
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:", SYSTEMD_LOG_COLOR="0")
    return subprocess.run(["systemd-analyze", "verify", str(tmp_path / "masqd.service")],
                          capture_output=True, text=True, timeout=60, env=env)


def rendered() -> str:
    text = UNIT.read_text()
    assert "ExecStart=/opt/masqd/bin/masqd run -c /etc/masqd/masqd.toml\n" in text
    return text.replace("/opt/masqd/bin/masqd", str(MASQD))


def test_unit_verifies(tmp_path: Path) -> None:
    r = verify(tmp_path, rendered())
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_unit_with_netns_dropin_verifies(tmp_path: Path) -> None:
    r = verify(tmp_path, rendered(), DROPIN.read_text())
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


@pytest.mark.skipif(Path("/opt/masqd/bin/masqd").exists(), reason="masqd is installed in /opt/masqd here")
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check is not vacuous: an unknown key in the drop-in and a missing binary are reported."""
    r = verify(tmp_path, rendered(), DROPIN.read_text() + "CapabilityBoundingSett=CAP_NET_RAW\n")
    assert "Unknown key" in r.stdout + r.stderr
    other = tmp_path / "unrendered"
    other.mkdir()
    r = verify(other, UNIT.read_text())  # as shipped: /opt/masqd does not exist on this machine
    assert r.returncode != 0 and "/opt/masqd/bin/masqd" in r.stdout + r.stderr


def test_unit_says_what_the_issue_asks() -> None:
    s = dict(settings(UNIT))
    assert s["Type"] == "notify"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["WatchdogSec"] == "30s"
    assert s["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert s["NoNewPrivileges"] == s["ProtectHome"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["DeviceAllow"] == "/dev/net/tun rw" and s["DevicePolicy"] == "closed"
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    d = dict(settings(DROPIN))
    assert set(d["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}


def test_every_setting_is_documented() -> None:
    doc = DOC.read_text()
    missing = sorted({k for k, _ in settings(UNIT) + settings(DROPIN)
                      if not re.search(rf"`{re.escape(k)}=", doc)})
    assert not missing, f"docs/systemd.md does not explain: {missing}"
