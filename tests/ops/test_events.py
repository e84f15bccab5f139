"""``masqd events`` and the conntrack-style table filters: the line format, the filters, the
listeners' bounded queues (a slow listener is dropped and counted, the others go on), and the
control socket's streaming request, all over a real Engine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw
from scapy.layers.ipsec import ESP

from masqd import config
from masqd.engine import Engine
from masqd.ops.control import ControlError, request, stream
from masqd.ops.events import EventHub, format_event
from masqd.ops.runtime import Ops
from masqd.ops.tablefilter import entry_matches, parse_filter

H2, H3, SRV, WAN = "10.0.0.2", "10.0.0.3", "198.51.100.1", "203.0.113.200"


def real_cfg(tmp_path: Path, extra: str = "") -> config.Config:
    return config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\ngateway = "203.0.113.1"\n'
                        f'[control]\nsocket = "{tmp_path / "ctl.sock"}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
                        + extra)


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "A", payload: bytes = b"") -> bytes:
    return raw(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return raw(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def connect(eng: Engine, sport: int = 40000, now: float = 1.0, src: str = H2) -> int:
    """A TCP handshake from ``src``; returns the WAN port."""
    o = eng.process("lan", tcp(src, SRV, sport, 80, "S"), now)
    wport = int(IP(o[0][1])[TCP].sport)
    eng.process("wan", tcp(SRV, WAN, 80, wport, "SA"), now)
    return wport


class Spy:
    """Records every change of an engine as (kind, reason, row) at the moment it happens."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.items: list[tuple[str, str, dict[str, Any]]] = []
        eng.nat.subscribe(lambda ch: self.items.append((ch.kind, ch.reason, eng.entry_row(ch.entry, 1.0) or {})))

    def lines(self) -> list[str]:
        return [format_event(k, r, row) for k, r, row in self.items]


# ------------------------------------------------------------------ the line format
def test_tcp_lines_are_conntrack_lines_with_masqd_endpoints() -> None:
    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'
                              '[masquerade]\naccounting = true\n'))
    spy = Spy(eng)
    wport = connect(eng)
    eng.process("lan", tcp(H2, SRV, 40000, 80, "PA", b"hello"), 2.0)
    eng.flush()
    new, upd, destroy = spy.lines()
    assert wport == 40000  # port preservation: the same port on the WAN
    assert new == (f"[NEW] tcp 6 240 SYN_SENT src={H2} dst={SRV} sport=40000 dport=80 [UNREPLIED] "
                   f"src={SRV} dst={WAN} sport=80 dport=40000")
    assert upd == (f"[UPDATE] tcp 6 7440 ESTABLISHED src={H2} dst={SRV} sport=40000 dport=80 "
                   f"src={SRV} dst={WAN} sport=80 dport=40000")
    # conntrack's DESTROY: no timeout, no state; the counters after each tuple; masqd says why
    assert destroy == (f"[DESTROY] tcp 6 src={H2} dst={SRV} sport=40000 dport=80 packets=2 bytes=85 "
                       f"src={SRV} dst={WAN} sport=80 dport=40000 packets=1 bytes=40 reason=flush")


def test_udp_icmp_and_port_forward_lines() -> None:
    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'
                              '[forwarding]\nportfw = [{proto = "tcp", port = 8080, to = "10.0.0.3", '
                              'to_port = 80}]\n'))
    spy = Spy(eng)
    o = eng.process("lan", udp(H2, SRV, 5353, 53), 1.0)
    eng.process("wan", udp(SRV, WAN, 53, IP(o[0][1])[UDP].sport), 1.0)
    eng.process("lan", raw(IP(src=H2, dst=SRV) / ICMP(type=8, id=1234, seq=1) / b"ping"), 1.0)
    # a connection from the WAN to the port forward: its original direction is remote -> WAN
    assert eng.process("wan", tcp(SRV, WAN, 33333, 8080, "S"), 1.0)
    lines = spy.lines()
    assert lines[0] == (f"[NEW] udp 17 300 src={H2} dst={SRV} sport=5353 dport=53 [UNREPLIED] "
                        f"src={SRV} dst={WAN} sport=53 dport=5353")
    assert lines[1] == (f"[UPDATE] udp 17 300 src={H2} dst={SRV} sport=5353 dport=53 "
                        f"src={SRV} dst={WAN} sport=53 dport=5353")
    assert lines[2] == f"[NEW] icmp 1 60 src={H2} dst={SRV} id=1234 [UNREPLIED] src={SRV} dst={WAN} id=1234"
    assert lines[3] == (f"[NEW] tcp 6 240 SYN_SENT src={SRV} dst={WAN} sport=33333 dport=8080 [UNREPLIED] "
                        f"src={H3} dst={SRV} sport=80 dport=33333")
    assert parse_filter("dport=8080") and entry_matches(spy.items[3][2], parse_filter(f"src={SRV} dport=8080"))
    assert not entry_matches(spy.items[3][2], parse_filter(f"src={H3}"))


def test_esp_pairing_and_reasons_in_lines() -> None:
    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'))
    spy = Spy(eng)
    eng.process("lan", raw(IP(src=H2, dst=SRV) / ESP(spi=0x1001, seq=1, data=b"x" * 40)), 1.0)
    eng.process("wan", raw(IP(src=SRV, dst=WAN) / ESP(spi=0x2002, seq=1, data=b"y" * 40)), 1.0)
    eng.flush()
    assert spy.lines() == [
        f"[NEW] esp 50 120 PENDING src={H2} dst={SRV} spi=0x00001001 [UNREPLIED] src={SRV} dst={WAN} "
        "spi=0x00000000 helper=ipsec",
        f"[UPDATE] esp 50 1800 ESTABLISHED src={H2} dst={SRV} spi=0x00001001 src={SRV} dst={WAN} "
        "spi=0x00002002 helper=ipsec reason=paired",
        f"[DESTROY] esp 50 src={H2} dst={SRV} spi=0x00001001 src={SRV} dst={WAN} spi=0x00002002 "
        "helper=ipsec reason=flush",
    ]


# ------------------------------------------------------------------ filters
def test_conntrack_style_filters() -> None:
    row = {"proto": "tcp", "lan": "10.0.0.2:40000", "wan": "203.0.113.200:61000", "remote": "198.51.100.1:80",
           "state": "ESTABLISHED", "inbound": False}
    yes = ["src=10.0.0.2", "src=10.0.0.0/8", "dst=198.51.100.1", "sport=40000", "dport=80", "proto=6",
           "state=established", "proto=tcp sport=040000", "wan=203.0.113.200"]
    no = ["src=198.51.100.1", "dst=10.0.0.0/8", "sport=61000", "dport=40000", "proto=17", "state=fin_wait"]
    for f in yes:
        assert entry_matches(row, parse_filter(f)), f
    for f in no:
        assert not entry_matches(row, parse_filter(f)), f
    icmp = {"proto": "icmp", "lan": "10.0.0.2:7", "remote": "198.51.100.1:0", "wan": "203.0.113.200:7"}
    assert not entry_matches(icmp, parse_filter("sport=7"))  # ports are TCP's and UDP's
    assert entry_matches(icmp, parse_filter("proto=1 src=10.0.0.2"))
    for bad, msg in (("src=10.0.0.300", "not an IPv4"), ("dport=70000", "not a port"), ("sport=x", "not a port"),
                     ("colour=red", "unknown field"), ("dst=", "needs a value")):
        with pytest.raises(Exception, match=msg):
            parse_filter(bad)


# ------------------------------------------------------------------ the hub, without sockets
def test_no_listener_no_subscription_no_rendering() -> None:
    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'))
    rendered: list[Any] = []
    real = eng.entry_row
    eng.entry_row = lambda e, now=None: rendered.append(e) or real(e, now)  # type: ignore[method-assign]
    hub = EventHub(eng, {}, lambda: 1.0)
    connect(eng)
    assert rendered == [] and eng.nat._subs == []
    lst = hub.open({})
    connect(eng, 40001)
    assert len(rendered) == 2 and len(lst.queue) == 2
    hub.close(lst)
    assert eng.nat._subs == []
    connect(eng, 40002)
    assert len(rendered) == 2


def test_a_full_queue_drops_that_listener_only_and_counts_it() -> None:
    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'))
    c: dict[str, int] = {}
    hub = EventHub(eng, c, lambda: 1.0, queue_max=5)
    slow = hub.open({})
    picky = hub.open({"filter": "dport=443", "events": ["new"]})
    for i in range(2):  # 2 events each
        connect(eng, 41000 + i)
    eng.process("lan", udp(H2, SRV, 5353, 53), 1.0)
    assert len(slow.queue) == 5 and not slow.dropped  # full, nobody writes it out
    eng.process("lan", udp(H2, SRV, 5354, 53), 1.0)  # one more: dropped
    assert slow.dropped and c["events_listeners_dropped"] == 1 and c["events_lost"] == 5
    assert len(slow.queue) == 0
    # the other listener's filter kept its queue empty: it is not affected
    assert not picky.dropped and len(picky.queue) == 0
    eng.process("lan", tcp(H3, SRV, 50000, 443, "S"), 2.0)
    assert [it[3]["remote"] for it in picky.queue] == [f"{SRV}:443"]
    assert c["events_listeners"] == 2  # the dropped one leaves when its writer ends
    with pytest.raises(Exception, match="unknown event kind"):
        hub.open({"events": ["created"]})
    many = [hub.open({}) for _ in range(hub.max_listeners - 2)]
    with pytest.raises(Exception, match="listeners already connected"):
        hub.open({})
    for lst in [slow, picky, *many]:
        hub.close(lst)
    assert c["events_listeners"] == 0 and eng.nat._subs == []


# ------------------------------------------------------------------ over the control socket
def run_ops(tmp_path: Path, extra: str, body: Callable[[Ops, str, asyncio.AbstractEventLoop], Any],
            **kw: Any) -> Any:
    cfg = real_cfg(tmp_path, extra)
    eng = Engine(cfg)

    async def main() -> Any:
        ops = Ops(eng, cfg, install_signal_handlers=False, now=lambda: 1.0, **kw)
        await ops.start()
        try:
            return await asyncio.to_thread(body, ops, cfg.control.socket, asyncio.get_running_loop())
        finally:
            await ops.stop()

    return asyncio.run(main())


def in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in the daemon's loop (where the engine lives) and wait for it."""
    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(10)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_two_listeners_text_and_filtered_json(tmp_path: Path) -> None:
    def body(ops: Ops, path: str, loop: asyncio.AbstractEventLoop) -> None:
        text = stream(path, {"cmd": "events"})
        js = stream(path, {"cmd": "events", "format": "json", "filter": f"src={H3}", "events": ["new", "destroy"]})
        got_text: list[str] = []
        got_json: list[dict[str, Any]] = []
        import threading

        def read(it: Any, out: list[Any], n: int, parse: bool) -> None:
            for line in it:
                out.append(json.loads(line) if parse else line)
                if len(out) == n:
                    return

        # the generators send their request when first advanced: start readers, then wait for both
        t1 = threading.Thread(target=read, args=(text, got_text, 6, False))
        t2 = threading.Thread(target=read, args=(js, got_json, 2, True))
        t1.start()
        t2.start()
        wait_for(lambda: len(ops.event_hub.listeners) == 2)
        eng = ops.engine
        in_loop(loop, lambda: connect(eng, 40000, src=H2))
        in_loop(loop, lambda: connect(eng, 40001, src=H3))
        in_loop(loop, eng.flush)
        t1.join(10)
        t2.join(10)
        assert [x.split()[0] for x in got_text] == ["[NEW]", "[UPDATE]", "[NEW]", "[UPDATE]", "[DESTROY]",
                                                     "[DESTROY]"]
        assert got_json[0]["event"] == "new" and got_json[0]["lan"] == f"{H3}:40001"
        assert got_json[1]["event"] == "destroy" and got_json[1]["reason"] == "flush"
        assert got_json[1]["state"] == "ESTABLISHED" and abs(got_json[1]["time"] - time.time()) < 60
        text.close()
        js.close()
        wait_for(lambda: not ops.event_hub.listeners)  # the clients went: the hub let go
        assert ops.engine.nat._subs == []
        st = request(path, {"cmd": "stats"})
        assert st["events"]["events_sent"] == 8 and st["events"]["events_listeners"] == 0

    run_ops(tmp_path, "", body)


def test_a_slow_listener_is_dropped_the_others_get_everything(tmp_path: Path) -> None:
    import threading

    def body(ops: Ops, path: str, loop: asyncio.AbstractEventLoop) -> None:
        ops.event_hub.queue_max = 200
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(path)
        slow.sendall(b'{"cmd":"events"}\n')  # and then it reads nothing for a while
        fast: list[str] = []
        it = stream(path, {"cmd": "events", "format": "json"})
        n_conn = 3000  # 2 events each: far more than the slow one's socket and queue hold
        t = threading.Thread(target=lambda: [fast.append(x) for _, x in zip(range(2 * n_conn), it, strict=False)])
        t.start()
        got = bytearray()

        def slow_reader() -> None:
            # once it has been dropped, the slow one reads: what was written, why it was dropped, the end
            wait_for(lambda: ops.counters.events.get("events_listeners_dropped", 0) >= 1, 60)
            slow.settimeout(10)
            while chunk := slow.recv(65536):
                got.extend(chunk)

        ts = threading.Thread(target=slow_reader)
        ts.start()
        wait_for(lambda: len(ops.event_hub.listeners) == 2)
        eng = ops.engine
        for k in range(n_conn // 100):  # in slices, so the loop writes to the sockets in between
            in_loop(loop, lambda k=k: [connect(eng, 1024 + k * 100 + i) for i in range(100)])
            # the fast one keeps up: it has read each slice before the next (a reader thread starved
            # by a loaded machine would otherwise fall 200 events behind and be dropped too)
            wait_for(lambda k=k: len(fast) >= 2 * 100 * (k + 1), 30)
        t.join(30)
        ts.join(30)
        assert len(fast) == 2 * n_conn and all(json.loads(x)["event"] in ("new", "update") for x in fast)
        assert ops.counters.events["events_listeners_dropped"] == 1
        lines = got.decode().splitlines()
        assert json.loads(lines[0])["ok"] is True
        assert lines[-1].startswith("# masqd: listener dropped")
        assert 0 < len(lines) - 2 < 2 * n_conn
        slow.close()
        it.close()

    run_ops(tmp_path, "", body)


def test_bad_events_requests_are_refused_and_counted(tmp_path: Path) -> None:
    def body(ops: Ops, path: str, loop: asyncio.AbstractEventLoop) -> None:
        for req, msg in (({"filter": "sport=http"}, "not a port"), ({"events": "birth"}, "unknown event kind"),
                         ({"format": "xml"}, "text or json"), ({"filter": 5}, "must be a string")):
            with pytest.raises(ControlError, match=msg):
                next(stream(path, {"cmd": "events", **req}))
        assert ops.counters.control_errors == {"bad_argument": 4}
        assert not ops.event_hub.listeners

    run_ops(tmp_path, "", body)


def test_table_count_and_conntrack_filters_over_the_socket(tmp_path: Path) -> None:
    def body(ops: Ops, path: str, loop: asyncio.AbstractEventLoop) -> None:
        eng = ops.engine
        in_loop(loop, lambda: [connect(eng, 40000 + i, src=H2 if i % 2 else H3) for i in range(6)])
        in_loop(loop, lambda: eng.process("lan", udp(H2, SRV, 5353, 53), 1.0))
        assert request(path, {"cmd": "table", "count": True}) == {"count": 7}
        assert request(path, {"cmd": "table", "count": True, "filter": f"src={H2} proto=tcp"}) == {"count": 3}
        rows = request(path, {"cmd": "table", "filter": "dport=53"})
        assert [r["proto"] for r in rows] == ["udp"]
        assert {r["lan"] for r in request(path, {"cmd": "table", "filter": "sport=40001"})} == {f"{H2}:40001"}
        rows = request(path, {"cmd": "table", "filter": "proto=tcp state=ESTABLISHED"})
        assert len(rows) == 6 and all("packets_out" in r for r in rows)
        assert rows[0]["packets_out"] == 1 and rows[0]["packets_in"] == 1

    run_ops(tmp_path, "[masquerade]\naccounting = true\n", body)


def test_a_change_that_cannot_be_rendered_costs_no_packet() -> None:
    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'))
    c: dict[str, int] = {}
    hub = EventHub(eng, c, lambda: 1.0)
    lst = hub.open({})

    def broken(e: Any, now: float | None = None) -> Any:
        raise RuntimeError("cannot render")

    eng.entry_row = broken  # type: ignore[method-assign]
    out = eng.process("lan", udp(H2, SRV, 5353, 53), 1.0)
    assert len(out) == 1 and out[0][0] == "wan"  # forwarded all the same
    assert c["events_errors"] == 1 and not lst.queue and eng.counters.get("drop_internal_error", 0) == 0


def test_pcp_mappings_are_events_too() -> None:
    """A NAT-PMP mapping a LAN host asks for is announced (NEW) and, deleted, DESTROYed."""
    import struct

    eng = Engine(config.loads(f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "{WAN}/24"\n'
                              'gateway = "203.0.113.1"\n[pcp]\nenabled = true\n'))
    spy = Spy(eng)
    for life in (3600, 0):  # map, then delete
        req = struct.pack("!BBHHHI", 0, 2, 0, 8080, 40000, life)
        assert eng.process("lan", udp(H2, "10.0.0.1", 5000, 5351, req), 1.0)
    assert spy.lines() == [
        f"[NEW] pcp 0 3600 NAT-PMP proto=tcp src={H2} sport=8080 dst={WAN} dport=40000 client={H2}",
        f"[DESTROY] pcp 0 proto=tcp src={H2} sport=8080 dst={WAN} dport=40000 client={H2} reason=deleted"]
