"""``wan.address_source = "interface:NAME"`` on the real masqd process (TAP lab, real namespaces).

masqd runs in ``{p}-fw`` next to a dummy interface ``dummy0`` whose address
plays the part of a PPP/DHCP link's public address. Checked: masqd starts from
dummy0's address (not the config's); ``ip addr`` changes reach the control
socket's status, the table and the metrics within 1 s; new TCP and UDP
connections from a LAN host are seen on the far side (srv1) from the new
address; an address removed or the interface deleted keeps the last address
with a warning and a counter; an address overlapping the LAN is refused;
SIGTERM stops the watcher thread cleanly; a missing interface is a clear
refusal at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from masqd.lab import FW_WAN, SRV1, Lab, LabError, MasqdProcess, stop_process
from masqd.ops.control import request

pytestmark = pytest.mark.integration

START = "203.0.113.210"  # dummy0's address when masqd starts (the config says FW_WAN)


@dataclass
class Env:
    lab: Lab
    masqd: MasqdProcess
    sock: str


def _ip(lab: Lab, *args: str) -> None:
    lab.exec("fw", ["ip", *args])


def _add_dummy(lab: Lab) -> None:
    """``dummy0`` in masqd's namespace: a dummy device, or one end of a veth pair on kernels without dummy."""
    cp = lab.exec("fw", ["ip", "link", "add", "dummy0", "type", "dummy"], check=False)
    if cp.returncode != 0:
        _ip(lab, "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy0p")
        _ip(lab, "link", "set", "dummy0p", "up")
    lab.exec("fw", ["sysctl", "-qw", "net.ipv4.conf.dummy0.promote_secondaries=1"])


def _config(lab: Lab, source: str = "interface:dummy0") -> str:
    text = lab.masqd_config()
    return text.replace('gateway = "203.0.113.1"\n',
                        f'gateway = "203.0.113.1"\naddress_source = "{source}"\ndynaddr_mode = "flush"\n', 1)


def _stats(env: Env) -> dict[str, Any]:
    return dict(request(env.sock, {"cmd": "stats"}))


def _wait(pred: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``pred()`` held (polled every 10 ms); raises AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def _metrics(lab: Lab) -> str:
    code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9598/metrics', timeout=5).read().decode())"
    return lab.exec("fw", [sys.executable, "-c", code], timeout=20).stdout


def _seen_as_udp(lab: Lab, port: int) -> list[str]:
    srv = lab.tool_server("srv1", ["udp-echo", str(port)])
    try:
        rc, rep = lab.tool("lan2", ["udp-client", SRV1, str(port), "2"])
    finally:
        stop_process(srv)
    assert rc == 0, rep
    return [p.split(":")[0] for p in rep["seen_as"]]


def _seen_as_tcp(lab: Lab, port: int) -> str:
    srv = lab.tool_server("srv1", ["tcp-server", str(port)])
    try:
        rc, rep = lab.tool("lan3", ["tcp-client", SRV1, str(port), "20000"])
    finally:
        stop_process(srv)
    assert rc == 0 and rep["ok"], rep
    return str(rep["seen_as"]).split(":")[0]


@pytest.fixture(scope="module")
def env(stale_labs_removed: None) -> Iterator[Env]:
    lab = Lab(f"t{os.getpid()}w", mode="tap")
    lab.down()
    mp: MasqdProcess | None = None
    try:
        lab.up()
        _add_dummy(lab)
        _ip(lab, "addr", "add", f"{START}/24", "dev", "dummy0")
        _ip(lab, "link", "set", "dummy0", "up")
        mp = lab.start_masqd(_config(lab))
        yield Env(lab, mp, f"/run/masqd/{lab.prefix}.sock")
    finally:
        if mp is not None:
            mp.stop()
        lab.down()


def test_starts_from_the_interface_address(env: Env) -> None:
    assert f"address = \"{FW_WAN}/24\"" in env.masqd.cfg_path.read_text()
    assert _stats(env)["wan_address"] == START  # not FW_WAN from the config
    assert _seen_as_udp(env.lab, 5401) == [START]
    assert _seen_as_tcp(env.lab, 5402) == START
    assert '"wan_address_source"' in env.masqd.log()


def test_address_change_followed_within_one_second(env: Env) -> None:
    lab = env.lab
    changes0 = _stats(env)["counters"].get("wan_address_changes", 0)
    # keep a TCP entry from the old address in the table: it must go (dynaddr_mode flush)
    assert _seen_as_udp(lab, 5403) == [START]
    old_rows = [r for r in request(env.sock, {"cmd": "table"}) if r["wan"].startswith(START + ":")]
    assert old_rows
    t0 = time.monotonic()
    _ip(lab, "addr", "add", "203.0.113.211/24", "dev", "dummy0")
    _ip(lab, "addr", "del", f"{START}/24", "dev", "dummy0")  # 211 is promoted to primary
    dt = _wait(lambda: _stats(env)["wan_address"] == "203.0.113.211", 1.0)
    took = time.monotonic() - t0
    print(f"address change seen on the control socket {dt:.3f} s after the ip commands ({took:.3f} s in all)")
    st = _stats(env)
    assert st["counters"]["wan_address_changes"] == changes0 + 1
    assert st["counters"]["wanwatch_updates"] >= 1
    # the old entries are gone from the table; new connections leave from the new address
    assert not [r for r in request(env.sock, {"cmd": "table"}) if r["wan"].startswith(START + ":")]
    assert _seen_as_udp(lab, 5404) == ["203.0.113.211"]
    assert _seen_as_tcp(lab, 5405) == "203.0.113.211"
    rows = request(env.sock, {"cmd": "table", "filter": "proto=tcp"})
    assert rows and all(r["wan"].startswith("203.0.113.211:") for r in rows), rows
    text = _metrics(lab)
    assert 'masqd_wan_address_info{address="203.0.113.211"} 1.0' in text
    assert any(ln.startswith("masqd_wan_address_changes_total ") and float(ln.split()[1]) >= 1
               for ln in text.splitlines()), text
    logs = [json.loads(x) for x in env.masqd.log().splitlines() if '"wan_address_set"' in x]
    assert logs and logs[-1]["address"] == "203.0.113.211/24" and logs[-1]["by"] == "interface:dummy0", logs


def test_address_removed_keeps_the_last_one(env: Env) -> None:
    lab = env.lab
    _ip(lab, "addr", "flush", "dev", "dummy0")
    _wait(lambda: _stats(env)["counters"].get("wanwatch_address_removed", 0) >= 1, 1.0)
    assert _stats(env)["wan_address"] == "203.0.113.211"
    assert _seen_as_udp(lab, 5406) == ["203.0.113.211"]  # still routing on the kept address
    assert '"wan_address_removed"' in env.masqd.log()
    assert "wanwatch_address_removed" in _metrics(lab)
    _ip(lab, "addr", "add", "203.0.113.212/24", "dev", "dummy0")
    _wait(lambda: _stats(env)["wan_address"] == "203.0.113.212", 1.0)
    assert _seen_as_udp(lab, 5407) == ["203.0.113.212"]


def test_lan_overlapping_address_refused(env: Env) -> None:
    lab = env.lab
    _ip(lab, "addr", "flush", "dev", "dummy0")
    _ip(lab, "addr", "add", "10.9.9.9/8", "dev", "dummy0")
    _wait(lambda: _stats(env)["counters"].get("wanwatch_refused", 0) >= 1, 1.0)
    assert _stats(env)["wan_address"] == "203.0.113.212"
    assert '"wan_address_refused"' in env.masqd.log()
    _ip(lab, "addr", "flush", "dev", "dummy0")
    _ip(lab, "addr", "add", "203.0.113.213/24", "dev", "dummy0")
    _wait(lambda: _stats(env)["wan_address"] == "203.0.113.213", 1.0)


def test_interface_deleted_then_recreated(env: Env) -> None:
    lab = env.lab
    _ip(lab, "link", "del", "dummy0")
    _wait(lambda: _stats(env)["counters"].get("wanwatch_interface_missing", 0) >= 1, 1.0)
    assert _stats(env)["wan_address"] == "203.0.113.213"
    assert '"wan_interface_missing"' in env.masqd.log()
    _add_dummy(lab)
    _ip(lab, "addr", "add", "203.0.113.214/24", "dev", "dummy0")
    _ip(lab, "link", "set", "dummy0", "up")
    _wait(lambda: _stats(env)["wan_address"] == "203.0.113.214", 1.0)
    assert _seen_as_tcp(lab, 5408) == "203.0.113.214"


def test_reload_keeps_the_followed_address(env: Env) -> None:
    """The config still says FW_WAN: a reload must not take the address back to it."""
    assert request(env.sock, {"cmd": "reload"})["ok"] is True
    assert _stats(env)["wan_address"] == "203.0.113.214"
    assert _seen_as_udp(env.lab, 5409) == ["203.0.113.214"]  # the TAP side answers ARP for it too


def test_sigterm_stops_the_watcher_cleanly(env: Env) -> None:
    t0 = time.monotonic()
    rc = env.masqd.stop()
    took = time.monotonic() - t0
    assert rc == 0, env.masqd.log()
    assert took < 3.0
    assert "Traceback" not in env.masqd.log()
    assert "wanwatch_stop_timeout" not in env.masqd.log()
    env.masqd = env.lab.start_masqd(_config(env.lab))  # the module fixture stops this one
    assert _stats(env)["wan_address"] == "203.0.113.214"


def test_missing_interface_refused_at_start(env: Env) -> None:
    with pytest.raises(LabError) as exc:
        env.lab.start_masqd(_config(env.lab, "interface:nosuch0"))
    msg = str(exc.value)
    assert "no interface 'nosuch0'" in msg and "Traceback" not in msg, msg
    bad = subprocess.run([sys.executable, "-m", "masqd.cli", "check", "-c", "/dev/stdin"],
                         input=_config(env.lab, "interface:bad/name"), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "wan.address_source" in bad.stderr and "Traceback" not in bad.stderr
    assert _stats(env)["wan_address"] == "203.0.113.214"  # the running masqd was not disturbed
