"""``Engine.table_summary()``: the per-(protocol, state) counts metrics export, equal to counting
``table()`` rows, without building the table."""

from __future__ import annotations

from collections import Counter

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, SRV, WAN_IP, echo, make_cfg, tcp, udp


def test_summary_equals_counting_the_table() -> None:
    eng = Engine(make_cfg('[forwarding]\nportfw = [{proto = "tcp", port = 8080, to = "10.0.0.3", to_port = 80}]\n'))
    for p in range(50):
        eng.process("lan", udp(H2, SRV, 1000 + p, 53), 0.0)
    out = eng.process("lan", udp(H3, SRV, 2000, 53), 0.0)
    wport = int.from_bytes(out[0][1][20:22], "big")
    eng.process("wan", udp(SRV, WAN_IP, 53, wport, b"r"), 0.1)  # one replied
    eng.process("lan", tcp(H2, SRV, 5000, 80, "S"), 0.2)
    eng.process("lan", echo(H3, SRV), 0.3)
    eng.process("wan", tcp(SRV, WAN_IP, 40000, 8080, "S"), 0.4)  # through the forward
    rows = Counter((r["proto"].lower(), (r["state"] or "none").lower()) for r in eng.table(0.5))
    assert eng.table_summary() == dict(rows)
    assert rows[("udp", "unreplied")] == 50 and rows[("udp", "replied")] == 1
