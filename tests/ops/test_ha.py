"""The active/backup sync (masqd.ops.ha) between two engines, message by message: the standby's
table follows the active's (changes, full resync, sweep); bad input is dropped and counted
(wrong peer, bad HMAC, replay, malformed, another configuration), never applied, never opens an
inbound hole; gaps, reordering and overflow end in a full resync; the active's own table is
never changed by its peer; the standby that takes over forwards the active's sessions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scapy.all import IP, UDP

from masqd.config import Config
from masqd.engine import Engine
from masqd.ops import ha as hamod
from tests.engine.conftest import H2, H3, SRV, WAN_IP, make_cfg, tcp, udp

KEY = b"k" * 32
A_ADDR, B_ADDR = ("10.254.0.1", 7017), ("10.254.0.2", 7017)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, ev: str, **kw: Any) -> None:
        self.lines.append(("info", ev, kw))

    def warning(self, ev: str, **kw: Any) -> None:
        self.lines.append(("warning", ev, kw))

    def error(self, ev: str, **kw: Any) -> None:
        self.lines.append(("error", ev, kw))


class Wire:
    """What one node sent (the datagrams, in order)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def take(self) -> list[bytes]:
        out, self.sent = self.sent, []
        return out


def ha_cfg(me: tuple[str, int], peer: tuple[str, int], extra: str = "") -> Config:
    return make_cfg(f'[ha]\nenabled = false\nlisten = "{me[0]}:{me[1]}"\npeer = "{peer[0]}:{peer[1]}"\n'
                    + extra)


class Node:
    def __init__(self, me: tuple[str, int], peer: tuple[str, int], extra: str = "", key: bytes = KEY) -> None:
        self.now = 100.0
        cfg = ha_cfg(me, peer, extra)
        self.eng = Engine(cfg)
        self.active: list[bool] = []
        self.log = Log()
        self.ha = hamod.HA(self.eng, cfg, key, clock=lambda: self.now, set_active=self.active.append,
                           sync=lambda hold=True: None, log=self.log)
        self.wire = Wire()
        self.ha.transport = self.wire  # type: ignore[assignment]
        self.addr = me

    def rows(self) -> list[str]:
        return sorted(json.dumps({k: v for k, v in r.items() if k != "expires_in"}, sort_keys=True)
                      for r in self.eng.table(self.now))


def pair(extra: str = "") -> tuple[Node, Node]:
    a, b = Node(A_ADDR, B_ADDR, extra), Node(B_ADDR, A_ADDR, extra)
    a.ha.set_role("active", "test")
    return a, b


def deliver(src: Node, dst: Node, msgs: list[bytes] | None = None) -> None:
    for m in src.wire.take() if msgs is None else msgs:
        dst.ha.received(m, src.addr)


def sync(a: Node, b: Node, rounds: int = 4) -> None:
    """Let the two talk: hellos, changes, bulks."""
    for _ in range(rounds):
        b.ha._hello()
        deliver(b, a)
        a.ha.tick()
        deliver(a, b)


def flows(eng: Engine, now: float, n: int = 3) -> list[int]:
    ports = []
    for i in range(n):
        o = eng.process("lan", udp(H2, SRV, 2000 + i, 53), now)
        ports.append(IP(o[0][1])[UDP].sport)
    return ports


def test_the_standby_follows_the_active_change_by_change_and_after_a_full_resync() -> None:
    a, b = pair()
    b.eng.process("lan", udp(H3, SRV, 999, 53), b.now)  # something stale the resync must remove
    flows(a.eng, a.now)
    sync(a, b)
    assert b.ha.synced and b.rows() == a.rows() and b.ha.c["ha_resyncs"] == 1
    a.eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), a.now)
    a.eng.flush(proto=17, lan_ip=int.from_bytes(bytes([10, 0, 0, 2]), "big"))
    a.ha.tick()
    deliver(a, b)
    assert b.rows() == a.rows() and len(b.eng.nat) == 1
    assert b.active == [] and a.active == [True]


def test_a_resync_is_made_in_parts_and_changes_made_meanwhile_follow_it(monkeypatch: Any) -> None:
    """The active makes a full resync a share at a time (``BULK_RECS_PER_TICK`` sessions a tick),
    so a large table does not hold its loop for all of it. Sessions removed, added or changed
    while it is being made end up on the standby as on the active: the removed ones are left out
    of it, and every change waits for its end."""
    monkeypatch.setattr(hamod, "BULK_RECS_PER_TICK", 4)  # (the setting under test: 12 sessions, 3 parts)
    a, b = pair()
    flows(a.eng, a.now, 12)
    b.ha._hello()  # the standby asks for a resync
    deliver(b, a)
    a.ha.tick()
    assert a.ha.bulk_src is not None and a.ha.bulk_pos == 4  # one part made and sent
    deliver(a, b)
    src = list(a.ha.bulk_src)
    for s in src[4:8]:  # the whole next part, not made yet: left out (that part adds nothing)
        a.eng.nat.remove(s, "test")
    a.eng.nat.remove(src[0], "test")  # already sent: its removal follows the bulk
    a.eng.process("lan", udp(H3, SRV, 7000, 53), a.now)  # new meanwhile
    a.now += 5
    a.eng.process("lan", udp(H2, SRV, 2005, 53), a.now)  # refreshed meanwhile
    ticks = 1
    while a.ha.bulk_busy:
        a.ha.tick()
        deliver(a, b)
        ticks += 1
    assert ticks == 3 and b.ha.synced and b.ha.c["ha_resyncs"] == 1  # three parts, the end sent with the last
    assert a.ha.bulk_n == 8  # 4 + 0 + 4 records: none for a session removed before its part was made
    a.ha.tick()  # the changes made meanwhile
    deliver(a, b)
    b.now = a.now
    assert b.rows() == a.rows() and len(b.eng.nat) == len(a.eng.nat) >= 8  # (12 - 5 + the new one, and 2005's
    # again if it was one of those removed)


def test_the_standby_that_takes_over_forwards_the_actives_sessions_with_full_lifetimes() -> None:
    a, b = pair()
    ports = flows(a.eng, a.now)
    sync(a, b)
    b.now = 5000.0  # long after the last record: rearmed, nothing expires at once
    res = b.ha.set_role("active", "keepalived")
    assert res == {"role": "active", "old": "backup", "synced": True} and b.active == [True]
    b.eng.expire(b.now + 1)
    back = b.eng.process("wan", udp(SRV, WAN_IP, 53, ports[0]), b.now)
    assert IP(back[0][1]).dst == H2 and IP(back[0][1])[UDP].dport == 2000
    assert ("info", "ha_role_changed") in [(lv, ev) for lv, ev, _ in b.log.lines]


def test_forged_messages_are_dropped_and_never_open_an_inbound_hole() -> None:
    a, b = pair()
    sync(a, b)
    forger = Node(A_ADDR, B_ADDR, key=b"x" * 32)  # the right address, not the key
    forger.ha.set_role("active", "test")
    forger.eng.process("lan", udp(H2, SRV, 3000, 53), forger.now)
    forger.ha.tick()
    msgs = forger.wire.take()
    deliver(forger, b, msgs)
    assert len(b.eng.nat) == 0 and b.ha.c["ha_dropped_bad_hmac"] == len(msgs)
    # a record naming that port opens nothing: inbound to it is still dropped
    assert b.eng.process("wan", udp(SRV, WAN_IP, 53, 3000), b.now) == []


@pytest.mark.parametrize("how", ["wrong_peer", "replay", "malformed", "config_mismatch", "truncated"])
def test_bad_messages_are_counted_by_reason_and_change_nothing(how: str) -> None:
    a, b = pair()
    sync(a, b)
    before = b.rows()
    flows(a.eng, a.now, 1)
    a.ha.tick()
    (msg,) = a.wire.take()
    if how == "wrong_peer":
        b.ha.received(msg, ("10.254.0.9", 7017))
    elif how == "replay":
        b.ha.received(msg, A_ADDR)
        before = b.rows()
        b.ha.received(msg, A_ADDR)
    elif how == "malformed":  # authentic, but the body is not records
        a.ha._send(hamod.T_UPDATE, b'[["u", {"k": "session", "v": 1}]]')
        msg = a.wire.take()[0]
        b.ha.received(msg, A_ADDR)
    elif how == "config_mismatch":
        other = Node(A_ADDR, B_ADDR, "[masquerade]\nports = [2000, 3000]\n")
        other.ha.set_role("active", "test")
        other.ha._send(hamod.T_HELLO, b'{"role": "active"}')
        b.ha.received(other.wire.take()[0], A_ADDR)
    else:
        b.ha.received(msg[:20], A_ADDR)
    reason = "malformed" if how == "truncated" else how
    assert b.ha.c.get(f"ha_dropped_{reason}") == 1, b.ha.c
    assert b.rows() == before


def test_the_actives_table_is_never_changed_by_its_peer() -> None:
    a, b = pair()
    flows(a.eng, a.now)
    sync(a, b)
    b.ha.set_role("active", "split-brain")  # both think they are active
    b.eng.process("lan", udp(H3, SRV, 4000, 53), b.now)
    b.eng.flush()
    b.ha.tick()
    before = a.rows()
    deliver(b, a)
    assert a.rows() == before and a.ha.c["ha_dropped_not_backup"] >= 1


def test_loss_and_reordering_end_in_a_resync_and_the_same_table() -> None:
    a, b = pair()
    sync(a, b)
    for i in range(5):
        a.eng.process("lan", udp(H2, SRV, 5000 + i, 53), a.now)
        a.ha.tick()
    msgs = a.wire.take()
    assert len(msgs) == 5
    deliver(a, b, [msgs[0], msgs[2], msgs[1], msgs[4]])  # one lost, two swapped
    assert b.ha.c["ha_gaps"] >= 1 and b.ha.c["ha_dropped_replay"] == 1 and not b.ha.synced
    sync(a, b)
    assert b.ha.synced and b.rows() == a.rows() and b.ha.c["ha_resyncs"] == 2


def test_a_full_queue_is_counted_and_followed_by_a_resync() -> None:
    a, b = pair("queue_max = 16\n")
    sync(a, b)
    flows(a.eng, a.now, 40)
    assert a.ha.c["ha_overflows"] >= 1
    sync(a, b)
    assert b.rows() == a.rows() and len(b.eng.nat) == 40


def test_a_restarted_peer_is_resynced() -> None:
    a, b = pair()
    flows(a.eng, a.now)
    sync(a, b)
    b2 = Node(B_ADDR, A_ADDR)  # the standby restarted: new boot id, empty table
    sync(a, b2)
    assert b2.rows() == a.rows() and b2.ha.synced
    a2 = Node(A_ADDR, B_ADDR)  # the active restarted (now as a standby): b2 takes over, a2 follows
    b2.ha.set_role("active", "test")
    sync(b2, a2)
    assert a2.rows() == b2.rows() and a2.ha.synced
    assert a2.ha.ready() and b.ha.ready()


def test_a_standby_hearing_an_active_peer_is_not_ready_until_synced() -> None:
    a, b = pair("sync_wait = 0\n")
    a.ha._hello()
    deliver(a, b)
    assert b.ha.peer_role == "active" and not b.ha.ready()
    sync(a, b)
    assert b.ha.ready()


def test_config_refuses_an_unusable_pair_or_state_section() -> None:
    from masqd.config import ConfigError

    with pytest.raises(ConfigError, match="tap"):
        make_cfg('[ha]\nenabled = true\npeer = "10.254.0.2:7017"\n')
    with pytest.raises(ConfigError, match="IPV4:PORT"):
        make_cfg('[ha]\npeer = "somewhere"\n')
    with pytest.raises(ConfigError, match="interval"):
        make_cfg("[state]\ninterval = 0.5\n")


def test_keepalived_fifo_lines_become_role_requests_in_order_and_the_end_is_a_fault(tmp_path: Any) -> None:
    import socket
    import threading

    from masqd.ops import keepalived

    assert keepalived.role_of('INSTANCE "masqd" MASTER 150') == "active"
    assert keepalived.role_of('INSTANCE "masqd" FAULT 150') == "fault"
    assert keepalived.role_of('GROUP "g" MASTER') is None
    sock_path = str(tmp_path / "ctl.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)
    got: list[dict[str, Any]] = []

    def serve() -> None:
        for _ in range(4):
            c, _ = srv.accept()
            with c:
                got.append(json.loads(c.makefile("rb").readline()))
                c.sendall(b'{"ok": true, "result": {}}\n')

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    fifo = tmp_path / "lines"
    fifo.write_text('INSTANCE "masqd" BACKUP 150\nINSTANCE "masqd" MASTER 150\nINSTANCE "masqd" BACKUP 150\n')
    assert keepalived._follow(sock_path, str(fifo)) is None
    assert keepalived.tell(sock_path, "fault", "keepalived-gone")
    t.join(5)
    srv.close()
    assert [(r["cmd"], r["role"], r["by"]) for r in got] == [
        ("role", "backup", "keepalived"), ("role", "active", "keepalived"), ("role", "backup", "keepalived"),
        ("role", "fault", "keepalived-gone")]
