"""Collector mapping, exposition validity (promtool) and the asyncio HTTP endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from masqd.ops.metrics import (
    MasqdCollector,
    MetricsServer,
    OpsCounters,
    classify,
    make_registry,
    parse_listen,
)

from .fake_engine import FakeEngine


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(engine: object, ops: OpsCounters | None = None) -> str:
    reg = make_registry(MasqdCollector(lambda: engine, ops or OpsCounters()))
    return generate_latest(reg).decode()


def test_classify_known_names() -> None:
    rule, labels = classify("rx_lan_tcp_packets")
    assert rule is not None and rule.family == "masqd_packets"
    assert labels == {"direction": "rx", "interface": "lan", "protocol": "tcp"}
    rule, labels = classify("drop_bad_checksum")
    assert rule is not None and rule.family == "masqd_drops" and labels == {"reason": "bad_checksum"}
    rule, labels = classify("esp_blocked")
    assert rule is not None and rule.family == "masqd_esp_events" and labels == {"event": "blocked"}
    rule, labels = classify("arp_wan_gratuitous")
    assert rule is not None and rule.family == "masqd_arp_events"
    assert labels == {"interface": "wan", "event": "gratuitous"}
    rule, labels = classify("pptp_call_ids_rewritten")
    assert rule is not None and rule.family == "masqd_pptp_events" and labels == {"event": "call_ids_rewritten"}
    rule, labels = classify("pptp_calls_setup")
    assert rule is not None and rule.family == "masqd_pptp_calls" and labels == {"event": "setup"}
    rule, labels = classify("fastpath_native_packets")
    assert rule is not None and rule.family == "masqd_fastpath_native" and labels == {"event": "packets"}
    rule, labels = classify("dp_coalesce_rounds")
    assert rule is not None and rule.family == "masqd_dataplane_events"
    assert labels == {"interface": "all", "event": "coalesce_rounds"}


def test_unknown_counter_kept_under_generic_family() -> None:
    rule, labels = classify("some_new_thing")
    assert rule is None and labels == {"name": "some_new_thing"}
    s = samples(scrape(FakeEngine()))
    assert s[("masqd_engine_events_total", (("name", "some_new_thing"),))] == 7


def test_scrape_values_follow_engine_counters() -> None:
    eng = FakeEngine()
    s = samples(scrape(eng))
    key = ("masqd_packets_total", (("direction", "rx"), ("interface", "lan"), ("protocol", "tcp")))
    assert s[key] == 10
    assert s[("masqd_bytes_total", (("direction", "tx"), ("interface", "wan"), ("protocol", "tcp")))] == 1400
    assert s[("masqd_drops_total", (("reason", "bad_checksum"),))] == 2
    assert s[("masqd_esp_events_total", (("event", "learned"),))] == 3
    assert s[("masqd_wan_address_changes_total", ())] == 1
    assert s[("masqd_port_pool_used_ports", (("protocol", "tcp"),))] == 1
    assert s[("masqd_port_pool_size_ports", (("protocol", "all"),))] == 64512
    assert s[("masqd_masq_sessions", ())] == 3
    # entries by protocol and state come from engine.table() when no gauge counter exists
    assert s[("masqd_masq_entries", (("protocol", "tcp"), ("state", "established")))] == 1
    assert s[("masqd_masq_entries", (("protocol", "esp"), ("state", "pending")))] == 1
    assert s[("masqd_wan_address_info", (("address", "203.0.113.200"),))] == 1
    eng.counters["rx_lan_tcp_packets"] += 5
    eng.entries.pop(0)
    s = samples(scrape(eng))
    assert s[key] == 15
    assert ("masqd_masq_entries", (("protocol", "tcp"), ("state", "established"))) not in s


def test_reader_stops_have_their_own_families_and_their_time_is_in_seconds() -> None:
    """The data plane counts its stops in microseconds; Prometheus gets seconds, in families of their own."""
    dp = {"dp_reader_stops": 40, "dp_reader_stopped_us": 2_500_000, "dp_reader_stops_over_1ms": 3,
          "dp_coalesce_rounds": 7}
    reg = make_registry(MasqdCollector(lambda: FakeEngine(), OpsCounters(), extra_counters=lambda: dp))
    s = samples(generate_latest(reg).decode())
    assert s[("masqd_dataplane_reader_stops_total", ())] == 40
    assert s[("masqd_dataplane_reader_stopped_seconds_total", ())] == pytest.approx(2.5)
    assert s[("masqd_dataplane_reader_stops_over_1ms_total", ())] == 3
    assert s[("masqd_dataplane_events_total", (("event", "coalesce_rounds"), ("interface", "all")))] == 7
    assert not [k for k in s if k[0] == "masqd_dataplane_events_total" and "reader" in dict(k[1]).get("event", "")]


def test_ops_counters_exported() -> None:
    ops = OpsCounters()
    ops.reloads_ok = 3
    ops.reloads_failed = 1
    ops.last_reload_ok = False
    ops.bump(ops.control_errors, "bad_json")
    ops.loop_latency.observe(0.0007)
    ops.loop_latency.observe(0.3)
    s = samples(scrape(FakeEngine(), ops))
    assert s[("masqd_reloads_total", (("result", "success"),))] == 3
    assert s[("masqd_reloads_total", (("result", "failure"),))] == 1
    assert s[("masqd_config_last_reload_successful", ())] == 0
    assert s[("masqd_control_errors_total", (("reason", "bad_json"),))] == 1
    assert s[("masqd_loop_lag_seconds_count", ())] == 2
    assert s[("masqd_loop_lag_seconds_bucket", (("le", "0.001"),))] == 1
    assert s[("masqd_loop_lag_seconds_bucket", (("le", "+Inf"),))] == 2


def test_no_engine_yet_still_scrapes() -> None:
    text = scrape(None)
    assert "masqd_reloads_total" in text


def test_promtool_check_metrics_passes() -> None:
    text = scrape(FakeEngine())
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9598") == ("127.0.0.1", 9598)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen(":9598") == ("0.0.0.0", 9598)
    with pytest.raises(ValueError):
        parse_listen("localhost")


def test_http_endpoint_serves_metrics_in_the_loop() -> None:
    async def main() -> tuple[int, str, int, int]:
        reg = make_registry(MasqdCollector(FakeEngine, OpsCounters()))
        srv = MetricsServer(reg, "/metrics")
        host, port = await srv.start("127.0.0.1", 0)

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""

        code, body = await asyncio.to_thread(get, "/metrics")
        nf, _ = await asyncio.to_thread(get, "/nope")
        hz, _ = await asyncio.to_thread(get, "/healthz")
        await srv.stop()
        return code, body, nf, hz

    code, body, nf, hz = asyncio.run(main())
    assert code == 200 and "masqd_packets_total" in body
    assert nf == 404 and hz == 200


def test_real_engine_counters_export_cleanly(tmp_path: object) -> None:
    """The real engine after some traffic: every counter lands in a family, promtool is happy."""
    from scapy.all import ICMP, IP, TCP, UDP  # type: ignore[import-untyped]

    from masqd import config
    from masqd.engine import Engine

    cfg = config.loads('[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
                       'gateway = "203.0.113.1"\n')
    eng = Engine(cfg)
    now = 100.0
    for p in (IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=1025, dport=23, flags="S"),
              IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=5000, dport=53),
              IP(src="10.0.0.3", dst="198.51.100.1") / ICMP(id=9)):
        eng.process("lan", bytes(p), now)
    eng.process("wan", b"\x45\x00\x00", now)  # truncated: a counted drop
    text = scrape(eng)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    s = samples(text)
    out_tcp = ("masqd_packets_total", (("direction", "tx"), ("interface", "wan"), ("protocol", "tcp")))
    assert s[out_tcp] == 1
    assert sum(v for (n, _), v in s.items() if n == "masqd_drops_total") >= 1
    assert s[("masqd_masq_sessions", ())] == 3
    assert sum(v for (n, _), v in s.items() if n == "masqd_masq_entries") == len(eng.table(now))


def test_large_table_not_walked_at_scrape_time() -> None:
    eng = FakeEngine()
    walked = []
    orig = eng.table

    def table(now: float | None = None) -> list[dict[str, object]]:
        walked.append(1)
        return orig(now)

    eng.table = table  # type: ignore[method-assign]
    eng.counters["sessions"] = 10
    assert "masqd_masq_entries{" in scrape(eng) and walked
    walked.clear()
    eng.counters["sessions"] = 2_000_000
    text = scrape(eng)
    assert not walked and "masqd_masq_sessions 2e+06" in text


def test_host_limits_offenders_and_table_bounds_are_exported_without_a_series_per_host() -> None:
    """Ten LAN hosts hit their port limit: the top offenders appear as N rank series plus one info
    series per rank naming the host; each bounded table has an entries and a limit gauge; the
    control socket's stats carry the same list. promtool accepts it all."""
    import struct

    from masqd import config
    from masqd.engine import Engine
    from masqd.ops.control import format_stats
    from masqd.wire.ipv4 import set_ip_checksum

    cfg = config.loads('[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
                       'gateway = "203.0.113.1"\n[limits]\nhost_max_ports = 2\ntop_offenders = 3\n')
    eng = Engine(cfg)
    from scapy.all import IP, UDP  # type: ignore[import-untyped]

    tpl = bytearray(bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=1, dport=53)))
    for h in range(10):
        for port in range(1000, 1003 + h):  # host h is refused 1 + h times
            struct.pack_into("!IH", tpl, 12, 0x0A000010 + h, 0)
            struct.pack_into("!H", tpl, 20, port)
            set_ip_checksum(tpl, 20)
            eng.process("lan", bytes(tpl), 5.0)
    text = scrape(eng)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    s = samples(text)
    scores = {dict(lb)["rank"]: v for (n, lb), v in s.items() if n == "masqd_host_limit_top_score"}
    infos = [dict(lb) for (n, lb), v in s.items() if n == "masqd_host_limit_top_info"]
    assert sorted(scores) == ["1", "2", "3"] and scores["1"] >= scores["2"] >= scores["3"]
    assert [i["host"] for i in sorted(infos, key=lambda i: i["rank"])] == ["10.0.0.25", "10.0.0.24", "10.0.0.23"]
    assert {i["reason"] for i in infos} == {"host_ports_limit"}
    assert s[("masqd_drops_total", (("reason", "host_ports_limit"),))] == sum(1 + h for h in range(10))
    assert s[("masqd_table_limit", (("table", "nat_sessions"),))] == 1_048_576
    assert s[("masqd_table_entries", (("table", "nat_sessions"),))] == 20
    for table in ("ipsec", "pptp", "defrag_datagrams", "defrag_bytes", "tcp_reset_keys"):
        assert ("masqd_table_limit", (("table", table),)) in s
    stats = {"counters": {}, "host_limits": eng.host_limits(5.0)}
    shown = format_stats(stats)
    assert "10.0.0.25" in shown and "host_ports_limit=10" in shown


def test_pcp_and_spi_announcement_counters_have_their_families() -> None:
    """The PCP / NAT-PMP server's counters (issue 22) land in dedicated families, promtool-clean."""
    from scapy.all import IP, UDP  # type: ignore[import-untyped]

    from masqd import config
    from masqd.engine import Engine
    from tests.engine import pcpclient as pc

    cfg = config.loads('[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
                       'gateway = "203.0.113.1"\n[pcp]\nenabled = true\n[ipsec]\nparallel_sessions = true\n')
    eng = Engine(cfg)
    h2 = "10.0.0.2"
    for payload in (pc.natpmp_map_request("tcp", 80, 8080, 3600), pc.map_request("10.0.0.3", b"n" * 12, 6, 81),
                    pc.spi_request(h2, b"n" * 12, 0x1000, 0x2000, "198.51.100.1"), b"\x00\x07", b"\x05\x01"):
        eng.process("lan", bytes(IP(src=h2, dst="10.0.0.1") / UDP(sport=4000, dport=5351) / payload), 1.0)
    eng.start(1.0)
    text = scrape(eng)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    s = samples(text)
    assert s[("masqd_pcp_mappings", ())] == 1
    assert s[("masqd_pcp_requests_total", (("protocol", "natpmp"),))] == 2
    assert s[("masqd_pcp_requests_total", (("protocol", "pcp"),))] == 3
    assert s[("masqd_pcp_refusals_total", (("protocol", "pcp"), ("result", "address_mismatch")))] == 1
    assert s[("masqd_pcp_refusals_total", (("protocol", "pcp"), ("result", "unsupp_version")))] == 1
    assert s[("masqd_pcp_refusals_total", (("protocol", "natpmp"), ("result", "unsupp_opcode")))] == 1
    assert s[("masqd_pcp_events_total", (("event", "mappings_created"),))] == 1
    assert s[("masqd_pcp_events_total", (("event", "announcements_sent"),))] == 1
    assert s[("masqd_spi_announcements_total", (("event", "announced"),))] == 1
    assert s[("masqd_esp_events_total", (("event", "announced"),))] == 1
    assert not [k for k in s if k[0] == "masqd_engine_events_total"], "a counter without a family"
