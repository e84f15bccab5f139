"""masqd.ops.wanwatch without a lab: address choice, netlink answers, the follower's decisions,
the watcher thread's life cycle, and reloads keeping a dynamic address (Ops with the real engine)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

import pytest

from masqd.config import Config, ConfigError, loads
from masqd.engine import Engine
from masqd.ops.runtime import Ops
from masqd.ops.wanwatch import (
    InterfaceState,
    StartError,
    WanAddressFollower,
    WanWatcher,
    choose,
    initial_config,
    read_interface,
)

from .conftest import make_cfg

A = ipaddress.IPv4Interface


def test_choose_keeps_the_current_address_else_the_primary() -> None:
    addrs = (A("203.0.113.5/24"), A("203.0.113.6/24"))
    assert choose(addrs, int(ipaddress.IPv4Address("203.0.113.6"))) == A("203.0.113.6/24")
    assert choose(addrs, int(ipaddress.IPv4Address("203.0.113.9"))) == A("203.0.113.5/24")
    assert choose(addrs, None) == A("203.0.113.5/24")
    assert choose((), None) is None


class FakeMsg(dict[str, Any]):
    def __init__(self, addr: str, plen: int, flags: int = 0, scope: int = 0) -> None:
        super().__init__(flags=flags, scope=scope, prefixlen=plen)
        self.attrs = {"IFA_ADDRESS": addr, "IFA_FLAGS": flags}

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self.attrs.get(key, super().get(key, default))


class FakeIPRoute:
    def __init__(self, links: dict[str, list[FakeMsg]]) -> None:
        self.links = links

    def link_lookup(self, ifname: str) -> list[int]:
        return [list(self.links).index(ifname) + 1] if ifname in self.links else []

    def get_addr(self, family: int, index: int) -> list[FakeMsg]:
        return self.links[list(self.links)[index - 1]]


def test_read_interface_orders_primary_first_and_skips_unusable() -> None:
    ipr = FakeIPRoute({"ppp0": [
        FakeMsg("203.0.113.7", 24, flags=0x01),  # secondary
        FakeMsg("127.0.0.9", 8, scope=254),  # host scope
        FakeMsg("203.0.113.8", 24, flags=0x40),  # tentative
        FakeMsg("203.0.113.5", 24),  # primary
    ]})
    st = read_interface(ipr, "ppp0")
    assert st == InterfaceState("ppp0", True, (A("203.0.113.5/24"), A("203.0.113.7/24")))
    assert read_interface(ipr, "ppp9") == InterfaceState("ppp9", False)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))


def _follower() -> tuple[WanAddressFollower, list[tuple[A, str]], Log]:
    applied: list[tuple[A, str]] = []
    state = {"cur": A("203.0.113.200/24")}

    def apply(addr: A, by: str) -> None:
        if addr.ip in ipaddress.IPv4Network("10.0.0.0/8"):
            raise ValueError(f"{addr} overlaps the LAN network")
        applied.append((addr, by))
        state["cur"] = addr

    log = Log()
    return WanAddressFollower("ppp0", apply, lambda: state["cur"], log), applied, log


def test_follower_applies_changes_keeps_on_loss_and_refuses_bad_addresses() -> None:
    f, applied, log = _follower()
    f(InterfaceState("ppp0", True, (A("203.0.113.200/24"),)))  # already ours: nothing to do
    assert applied == []
    f(InterfaceState("ppp0", True, (A("203.0.113.201/24"),)))
    assert applied == [(A("203.0.113.201/24"), "interface:ppp0")]
    for _ in range(3):  # removed: one warning and one count per loss, however many events
        f(InterfaceState("ppp0", True, ()))
    assert f.counters["wanwatch_address_removed"] == 1
    assert [e for lvl, e, _ in log.lines if lvl == "warning"] == ["wan_address_removed"]
    assert log.lines[0][2]["kept"] == "203.0.113.201/24"
    f(InterfaceState("ppp0", False))
    f(InterfaceState("ppp0", False))
    assert f.counters["wanwatch_interface_missing"] == 1
    f(InterfaceState("ppp0", True, (A("10.1.2.3/8"),)))
    assert f.counters["wanwatch_refused"] == 1 and applied[-1][0] == A("203.0.113.201/24")
    f(InterfaceState("ppp0", False, error="OSError: boom"))
    assert f.counters["wanwatch_errors"] == 1
    f(InterfaceState("ppp0", True, (A("203.0.113.202/24"), A("203.0.113.201/24"))))
    assert len(applied) == 1  # 201 is only secondary now, but it is the current one: kept
    f(InterfaceState("ppp0", True, (A("203.0.113.202/24"),)))
    assert applied[-1] == (A("203.0.113.202/24"), "interface:ppp0")
    assert f.counters["wanwatch_updates"] == len(applied) == 2


def test_follower_keeps_the_current_address_while_the_interface_still_has_it() -> None:
    f, applied, _ = _follower()
    f(InterfaceState("ppp0", True, (A("203.0.113.9/24"), A("203.0.113.200/24"))))
    assert applied == []


def test_watcher_thread_reports_and_stops_promptly() -> None:
    async def main() -> tuple[list[InterfaceState], bool, float]:
        got: list[InterfaceState] = []
        loop = asyncio.get_running_loop()
        watchers = [WanWatcher("lo", loop, got.append), WanWatcher("nosuch0", loop, got.append)]
        for w in watchers:
            w.start()
        for _ in range(200):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        stopped = all(w.stop() for w in watchers)
        return got, stopped and not any(w.running for w in watchers), time.monotonic() - t0

    got, stopped, took = asyncio.run(main())
    by_name = {s.ifname: s for s in got}
    assert by_name["lo"].present and by_name["lo"].addresses == ()  # 127.0.0.1 is host scope
    assert by_name["nosuch0"] == InterfaceState("nosuch0", False)
    assert stopped and took < 1.0


def test_initial_config_refuses_a_missing_interface(tmp_path: Any) -> None:
    cfg = make_cfg(tmp_path, wan={"address": "203.0.113.200/24", "address_source": "interface:nosuch0"})
    with pytest.raises(StartError, match="no interface 'nosuch0'"):
        initial_config(cfg)
    plain = make_cfg(tmp_path)
    assert initial_config(plain) is plain


@pytest.mark.parametrize("bad", ["iface:x", "interface:", "interface:a/b", "interface:ppp0@ns", "interface:" + "x" * 16])
def test_config_refuses_bad_address_sources(bad: str) -> None:
    text = f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\naddress_source = "{bad}"\n'
    with pytest.raises(ConfigError) as exc:
        loads(text, "t.toml")
    assert any(e.startswith("wan.address_source:") for e in exc.value.errors), exc.value.errors


def _ops(tmp_path: Any, source: str) -> tuple[Ops, Engine, list[Config]]:
    cfg = make_cfg(tmp_path, wan={"address": "203.0.113.200/24", "gateway": "203.0.113.1",
                                  "address_source": source})
    eng = Engine(cfg)
    seen: list[Config] = []
    return Ops(eng, cfg, install_signal_handlers=False, on_reload=seen.append), eng, seen


def test_reload_keeps_a_control_set_address(tmp_path: Any) -> None:
    ops, eng, seen = _ops(tmp_path, "control")
    ops.set_wan_address(A("203.0.113.201/24"), "control")
    assert eng.wan_if == A("203.0.113.201/24")
    ops._apply(ops.cfg)
    assert eng.wan_if == A("203.0.113.201/24")
    assert seen[-1].wan.address == A("203.0.113.201/24")  # the data plane's L2 host follows this one


def test_reload_with_config_source_returns_to_the_configured_address(tmp_path: Any) -> None:
    ops, eng, seen = _ops(tmp_path, "config")
    ops.set_wan_address(A("203.0.113.201/24"), "control")
    ops._apply(ops.cfg)
    assert eng.wan_if == A("203.0.113.200/24") and seen[-1].wan.address == A("203.0.113.200/24")


def test_set_wan_address_refuses_unusable_addresses(tmp_path: Any) -> None:
    ops, eng, _ = _ops(tmp_path, "control")
    for bad in ("10.2.3.4/8", "224.0.0.1/24", "127.0.0.2/8", "203.0.113.255/24"):
        with pytest.raises(ValueError):
            ops.set_wan_address(A(bad), "test")
    assert eng.wan_if == A("203.0.113.200/24")


def test_reload_starts_and_stops_the_watcher_when_the_source_changes(tmp_path: Any) -> None:
    async def main() -> tuple[bool, bool, bool]:
        ops, eng, _ = _ops(tmp_path, "control")
        ifcfg = ops.cfg.model_copy(update={"wan": ops.cfg.wan.model_copy(update={"address_source": "interface:lo"})})
        ops._apply(ifcfg)
        started = ops.wanwatch is not None and ops.wanwatch.running
        for _ in range(200):  # lo has no usable IPv4 address: the follower warns and keeps ours
            if ops.wanwatch_counters.get("wanwatch_address_removed"):
                break
            await asyncio.sleep(0.01)
        counted = ops._extra_counters().get("wanwatch_address_removed") == 1
        w = ops.wanwatch
        plain = ops.cfg.model_copy(update={"wan": ops.cfg.wan.model_copy(update={"address_source": "config"})})
        ops._apply(plain)
        stopped = ops.wanwatch is None and w is not None and not w.running
        return started, counted and eng.wan_if == A("203.0.113.200/24"), stopped

    assert asyncio.run(main()) == (True, True, True)
