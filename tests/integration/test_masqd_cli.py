"""``masqd check`` and ``masqd run`` on good and bad configurations: exit codes, messages, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from masqd.lab import Lab

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

BAD = """
[lan]
address = "10.0.0.1/33"
mode = "bridge"

[wan]
address = "203.0.113.200/24"
mtu = 9
gateway = "198.51.100.1"

[masquerade]
ports = [2000, 1000]
"""


def masqd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "masqd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("name", ["masqd.toml", "lab-tap.toml", "lab-tun.toml"])
def test_check_accepts_shipped_configs(name: str) -> None:
    cp = masqd("check", "-c", str(REPO / "config" / name))
    assert cp.returncode == 0, cp.stderr
    assert "OK" in cp.stdout


def test_shipped_lab_configs_match_the_lab() -> None:
    for mode in ("tap", "tun"):
        text = (REPO / "config" / f"lab-{mode}.toml").read_text()
        assert text == Lab("mq", mode).masqd_config()


@pytest.mark.parametrize("cmd", ["check", "run"])
def test_bad_config_lists_every_error_and_exits_2(tmp_path: Path, cmd: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD)
    cp = masqd(cmd, "-c", str(cfg))
    assert cp.returncode == 2
    assert "Traceback" not in cp.stderr + cp.stdout
    for key in ("lan.mode", "lan.address", "wan.mtu", "masquerade.ports"):
        assert key in cp.stderr, (key, cp.stderr)
    assert str(cfg) in cp.stderr


@pytest.mark.parametrize("text,needle", [
    ("this is = = not toml", "TOML"),
    ("[lan]\naddress='10.0.0.1/8'\n", "wan"),
])
def test_unusable_files_are_refused_cleanly(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(text)
    cp = masqd("check", "-c", str(cfg))
    assert cp.returncode == 2 and needle in cp.stderr and "Traceback" not in cp.stderr


def test_missing_file_is_refused_cleanly(tmp_path: Path) -> None:
    cp = masqd("run", "-c", str(tmp_path / "nope.toml"))
    assert cp.returncode == 2 and "cannot read" in cp.stderr and "Traceback" not in cp.stderr


def test_run_with_missing_namespace_fails_without_traceback(tmp_path: Path, root: None) -> None:
    cfg = tmp_path / "ns.toml"
    cfg.write_text(Lab("tnons0", "tap").masqd_config())  # that lab does not exist
    cp = masqd("run", "-c", str(cfg), timeout=20)
    assert cp.returncode == 1
    assert "tnons0-sw" in cp.stderr and "does not exist" in cp.stderr
    assert "Traceback" not in cp.stderr


def test_lab_commands(root: None, stale_labs_removed: None) -> None:
    import os

    prefix = f"t{os.getpid()}c"
    try:
        up = masqd("lab", "up", "--prefix", prefix, "--mode", "tun")
        assert up.returncode == 0, up.stderr
        again = masqd("lab", "up", "--prefix", prefix)
        assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
        st = masqd("lab", "status", "--prefix", prefix)
        assert st.returncode == 0 and f"{prefix}-lanedge" in st.stdout and "10.0.0.2/8" in st.stdout
        ex = masqd("lab", "exec", "lan3", "--prefix", prefix, "--", "ip", "-br", "addr", "show", "eth0")
        assert ex.returncode == 0 and "10.0.0.3/8" in ex.stdout
        bad = masqd("lab", "exec", "lan3", "--prefix", prefix, "--", "false")
        assert bad.returncode == 1
        # IPv6 is off in the lab
        v6 = masqd("lab", "exec", "lan2", "--prefix", prefix, "--", "sysctl", "-n",
                   "net.ipv6.conf.eth0.disable_ipv6")
        assert v6.stdout.strip() == "1"
    finally:
        down = masqd("lab", "down", "--prefix", prefix)
    assert down.returncode == 0 and f"{prefix}-sw" in down.stdout
    assert masqd("lab", "status", "--prefix", prefix).returncode == 1
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-")]
