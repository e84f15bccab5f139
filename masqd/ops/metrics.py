"""Prometheus metrics: export the engine's plain counters at scrape time.

The data plane never calls prometheus_client per packet (``.inc()`` takes a
lock). The engine counts in a plain ``dict[str, int]``; ops keeps its own few
counters in :class:`OpsCounters`. At scrape time :class:`MasqdCollector` reads
both and turns each name into a metric family by the rules in
:data:`COUNTER_RULES` (first match wins). A name no rule knows is still exported,
as ``masqd_engine_counter_total{name="..."}``, so nothing the engine counts is
lost when it grows a counter before this table does.

The HTTP endpoint is a small asyncio server running in the data plane's own
loop, so a scrape reads the engine from the only thread that writes it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# --------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match on an engine counter name) -> family + labels.

    Label values come from the pattern's named groups, and ``fixed`` adds
    constant labels. ``kind`` is "counter" or "gauge". ``scale`` turns the
    engine's unit into the family's base unit (microseconds into seconds).
    """

    pattern: re.Pattern[str]
    family: str
    doc: str
    labels: tuple[str, ...]
    kind: str = "counter"
    fixed: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0


def _r(
    pattern: str,
    family: str,
    doc: str,
    labels: tuple[str, ...] = (),
    kind: str = "counter",
    fixed: tuple[tuple[str, str], ...] = (),
    scale: float = 1.0,
) -> Rule:
    return Rule(re.compile(pattern), family, doc, labels + tuple(k for k, _ in fixed), kind, fixed, scale)


_IF = r"(?P<interface>lan|wan)"
_DIR = r"(?P<direction>rx|tx)"
_PROTO = r"(?P<protocol>[a-z0-9]+)"

#: Engine counter name -> metric. Counters are exported with ``_total``.
COUNTER_RULES: tuple[Rule, ...] = (
    _r(r"table_size_(?P<table>[a-z0-9_]+)", "masqd_table_entries",
       "Entries in each bounded table (NAT sessions, helpers' tables, reassembly queue...).", ("table",),
       kind="gauge"),
    _r(r"table_limit_(?P<table>[a-z0-9_]+)", "masqd_table_limit",
       "The configured bound of each table (see masqd_table_entries).", ("table",), kind="gauge"),
    _r(r"early_drop", "masqd_early_drops", "Sessions evicted (never replied or closing) to make room in a "
       "full table.", ()),
    _r(rf"{_DIR}_{_IF}_{_PROTO}_packets", "masqd_packets", "Packets by interface, direction and protocol.",
       ("direction", "interface", "protocol")),
    _r(rf"{_DIR}_{_IF}_{_PROTO}_bytes", "masqd_bytes", "Bytes (IPv4 packet length) by interface, direction and protocol.",
       ("direction", "interface", "protocol")),
    _r(rf"{_DIR}_{_IF}_packets", "masqd_packets", "Packets by interface, direction and protocol.",
       ("direction", "interface"), fixed=(("protocol", "all"),)),
    _r(rf"{_DIR}_{_IF}_bytes", "masqd_bytes", "Bytes (IPv4 packet length) by interface, direction and protocol.",
       ("direction", "interface"), fixed=(("protocol", "all"),)),
    _r(r"drop_(?P<reason>[a-z0-9_]+)", "masqd_drops", "Packets dropped, by reason.", ("reason",)),
    _r(r"(?:masq_)?entries_(?P<protocol>[a-z0-9]+)_(?P<state>[a-z0-9_]+)", "masqd_masq_entries",
       "Masquerade entries by protocol and state.", ("protocol", "state"), kind="gauge"),
    _r(r"(?:masq_)?entries_(?P<protocol>[a-z0-9]+)", "masqd_masq_entries",
       "Masquerade entries by protocol and state.", ("protocol",), kind="gauge", fixed=(("state", "all"),)),
    _r(r"(?:masq_)?(?P<event>created|expired|closed|moved)_(?P<protocol>[a-z0-9]+)", "masqd_masq_entry_events",
       "Masquerade entry life events by protocol.", ("event", "protocol")),
    _r(r"(?:masq_)?entries_(?P<event>created|expired|closed|moved)", "masqd_masq_entry_events",
       "Masquerade entry life events by protocol.", ("event",), fixed=(("protocol", "all"),)),
    _r(r"(?:port_)?pool_used_(?P<protocol>[a-z0-9]+)", "masqd_port_pool_used_ports",
       "WAN ports in use, by protocol.", ("protocol",), kind="gauge"),
    _r(r"(?:port_)?pool_size", "masqd_port_pool_size_ports",
       "WAN ports in the pool, by protocol.", (), kind="gauge", fixed=(("protocol", "all"),)),
    _r(r"sessions", "masqd_masq_sessions", "Masquerade sessions (lan endpoint + remote endpoint).", (),
       kind="gauge"),
    _r(r"mappings", "masqd_masq_mappings", "Masquerade mappings (lan endpoint -> wan port).", (),
       kind="gauge"),
    _r(r"frag_queue", "masqd_defrag_queue_datagrams", "Datagrams waiting for reassembly.", (),
       kind="gauge"),
    _r(r"(?:port_)?pool_(?P<protocol>[a-z0-9]+)_used", "masqd_port_pool_used_ports",
       "WAN ports in use, by protocol.", ("protocol",), kind="gauge"),
    _r(r"(?:port_)?pool_(?P<protocol>[a-z0-9]+)_size", "masqd_port_pool_size_ports",
       "WAN ports in the pool, by protocol.", ("protocol",), kind="gauge"),
    _r(r"(?:port_)?pool_exhausted(?:_(?P<protocol>[a-z0-9]+))?", "masqd_port_pool_exhausted",
       "Allocations refused because the port pool was exhausted.", ("protocol",)),
    _r(r"esp_(?P<event>pending|blocked|learned|guessed|spi0|expired|established|retries|[a-z0-9_]+)",
       "masqd_esp_events", "ESP masquerade events (pending = initial packet sent, blocked = temporarily "
       "blocked, learned = reply SPI paired, guessed = new inbound SPI sent to a recent re-keyer).", ("event",)),
    _r(r"isakmp_(?P<event>[a-z0-9_]+)", "masqd_isakmp_events", "ISAKMP/IKE masquerade events.", ("event",)),
    _r(r"pcp_mappings", "masqd_pcp_mappings", "Mappings LAN hosts hold through PCP / NAT-PMP (leases).", (),
       kind="gauge"),
    _r(r"pcp_requests_(?P<protocol>pcp|natpmp)", "masqd_pcp_requests",
       "Requests to the PCP / NAT-PMP server, by protocol (rate-limited ones excluded).", ("protocol",)),
    _r(r"pcp_refused_(?P<result>[a-z0-9_]+)", "masqd_pcp_refusals",
       "PCP / NAT-PMP requests refused, by protocol and the RFC's result code.", ("result",),
       fixed=(("protocol", "pcp"),)),
    _r(r"natpmp_refused_(?P<result>[a-z0-9_]+)", "masqd_pcp_refusals",
       "PCP / NAT-PMP requests refused, by protocol and the RFC's result code.", ("result",),
       fixed=(("protocol", "natpmp"),)),
    _r(r"(?:pcp|natpmp)_(?P<event>[a-z0-9_]+)", "masqd_pcp_events",
       "PCP / NAT-PMP server events (mappings created, renewed, deleted, expired; PEER; announcements; "
       "connections through leases).", ("event",)),
    _r(r"spi_(?P<event>announced|withdrawn|announce_refused_[a-z0-9_]+)", "masqd_spi_announcements",
       "SPI pairs LAN hosts announced (PCP SPI_ANNOUNCE), withdrew, or had refused (by reason).", ("event",)),
    _r(r"ah_(?P<event>[a-z0-9_]+)", "masqd_ah_events", "AH packets refused (cannot be masqueraded).", ("event",)),
    _r(r"pptp_calls_(?P<event>[a-z0-9_]+)", "masqd_pptp_calls", "PPTP call events (setup, established, cleared, ...).",
       ("event",)),
    _r(r"pptp_(?P<event>[a-z0-9_]+)", "masqd_pptp_events", "PPTP control/GRE events.", ("event",)),
    _r(r"gre_(?P<event>[a-z0-9_]+)", "masqd_gre_events", "GRE data-channel events.", ("event",)),
    _r(r"(?:fw_|rule_)?(?P<chain>input|forward|output)_(?P<verdict>accept|deny|reject|masq)",
       "masqd_chain_verdicts", "Firewall verdicts by chain.", ("chain", "verdict")),
    _r(r"(?:wan_)?(?:address|addr)_changes?", "masqd_wan_address_changes",
       "WAN address changes applied.", ()),
    _r(r"portfw_(?P<event>[a-z0-9_]+)", "masqd_portfw_events", "Inbound port-forward events.", ("event",)),
    _r(r"protofw_(?P<event>[a-z0-9_]+)", "masqd_protofw_events", "Inbound protocol-forward events.", ("event",)),
    _r(r"defrag_(?P<event>[a-z0-9_]+)", "masqd_defrag_events", "IP reassembly events.", ("event",)),
    _r(r"frag(?:ment)?s?_(?P<event>[a-z0-9_]+)", "masqd_fragment_events", "IP fragmentation events.", ("event",)),
    _r(r"icmp_(?P<event>[a-z0-9_]+)", "masqd_icmp_events",
       "ICMP events (errors translated, echo answered, unreachables sent...).", ("event",)),
    _r(r"hairpin(?:_(?P<event>[a-z0-9_]+))?", "masqd_hairpin_events", "Hairpinned packets.", ("event",)),
    _r(rf"arp_{_IF}_(?P<event>[a-z0-9_]+)", "masqd_arp_events",
       "ARP events by interface (TAP mode: requests, replies, gratuitous, conflicts...).", ("interface", "event")),
    _r(r"fastpath_native_(?P<event>packets|full|unavailable)", "masqd_fastpath_native",
       "The native flow cache: packets it forwarded without Python, flows it could not take "
       "(full), start-ups without the native module (unavailable).", ("event",)),
    _r(r"ha_role_(?P<role>active|backup|fault)", "masqd_ha_role",
       "Active/backup pair: 1 for this masqd's role.", ("role",), kind="gauge"),
    _r(r"ha_(?P<direction>sent|received)_messages", "masqd_ha_sync_messages",
       "Sync messages sent to and received from the peer.", ("direction",)),
    _r(r"ha_(?P<direction>sent|received)_bytes", "masqd_ha_sync_bytes",
       "Sync bytes sent to and received from the peer.", ("direction",)),
    _r(r"ha_dropped_(?P<reason>[a-z0-9_]+)", "masqd_ha_sync_dropped",
       "Sync messages dropped, by reason (wrong_peer, bad_hmac, replay, malformed, config_mismatch, "
       "not_backup).", ("reason",)),
    _r(r"ha_queue", "masqd_ha_sync_queue", "Table changes waiting to be sent to the peer.", (), kind="gauge"),
    _r(r"ha_lag_ms", "masqd_ha_sync_lag_milliseconds",
       "Age of the last sync message received (send time to receipt).", (), kind="gauge"),
    _r(r"ha_synced", "masqd_ha_synced", "1 when this masqd holds a full copy of the active's table.", (),
       kind="gauge"),
    _r(r"ha_(?P<event>[a-z0-9_]+)", "masqd_ha_events",
       "Active/backup events: role changes, resyncs sent and received, gaps, overflows, refusals.",
       ("event",)),
    _r(r"state_(?P<event>[a-z0-9_]+)", "masqd_state_events",
       "State file events: saves, entries restored, files and entries refused (by reason).", ("event",)),
    _r(r"dp_reader_stops", "masqd_dataplane_reader_stops",
       "Times the reader threads were stopped for the engine (a section: expiry, a miss, a reload).", ()),
    _r(r"dp_reader_stops_over_1ms", "masqd_dataplane_reader_stops_over_1ms",
       "Reader-thread stops that lasted over 1 ms (every packet in flight waited that long).", ()),
    _r(r"dp_reader_stopped_us", "masqd_dataplane_reader_stopped_seconds",
       "Time the reader threads spent stopped for the engine.", (), scale=1e-6),
    _r(rf"dp_{_IF}_(?P<event>[a-z0-9_]+)", "masqd_dataplane_events",
       "Data-plane events by interface (write errors, ARP, ...).", ("interface", "event")),
    _r(r"dp_(?P<event>[a-z0-9_]+)", "masqd_dataplane_events",
       "Data-plane events by interface (write errors, ARP, ...).", ("event",), fixed=(("interface", "all"),)),
)

GENERIC_COUNTER = "masqd_engine_events"
GENERIC_DOC = "Engine counters that have no dedicated metric family yet, by engine name."

_COUNTER_SUFFIXES = ("_total",)


def _family_name(rule: Rule) -> str:
    return rule.family


def classify(name: str) -> tuple[Rule | None, dict[str, str]]:
    """Map an engine counter name to (rule, labels); (None, {"name": name}) if unknown."""
    for rule in COUNTER_RULES:
        m = rule.pattern.fullmatch(name)
        if m is None:
            continue
        labels = {k: (v if v is not None else "all") for k, v in m.groupdict().items()}
        labels.update(dict(rule.fixed))
        return rule, labels
    return None, {"name": name}


# --------------------------------------------------------------------------- ops-side state


@dataclass
class LoopLatency:
    """Event-loop scheduling latency, recorded by a periodic probe into fixed buckets."""

    buckets: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
    counts: list[int] = field(default_factory=list)
    total: int = 0
    sum: float = 0.0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        self.last = seconds
        for i, b in enumerate(self.buckets):
            if seconds <= b:
                self.counts[i] += 1
                break


@dataclass
class OpsCounters:
    """Counters that ops itself owns (the engine's are in ``engine.counters``)."""

    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_ok: bool = True
    last_reload_time: float = 0.0
    wan_address_set: int = 0
    control_requests: dict[str, int] = field(default_factory=dict)
    control_errors: dict[str, int] = field(default_factory=dict)
    log_emitted: dict[str, int] = field(default_factory=dict)
    log_suppressed: dict[str, int] = field(default_factory=dict)
    capture_packets: dict[str, int] = field(default_factory=dict)
    # masqd events: events_listeners (now), events_sent, events_listeners_dropped, events_lost, events_errors
    events: dict[str, int] = field(default_factory=dict)
    loop_latency: LoopLatency = field(default_factory=LoopLatency)
    started: float = field(default_factory=time.time)

    def bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


# --------------------------------------------------------------------------- collector


def _as_int_map(obj: Any) -> Mapping[str, int | float]:
    if obj is None:
        return {}
    if callable(obj):
        obj = obj()
    if isinstance(obj, Mapping):
        # dict() of a dict is one C call under the GIL: a consistent snapshot.
        return dict(obj)
    return {}


#: Above this many sessions the per-state breakdown is not computed by walking
#: ``engine.table()`` at scrape time (it would stall the data plane); an engine
#: that keeps counts offers ``table_summary()`` instead.
TABLE_WALK_LIMIT = 50_000


def _entry_summary(engine: Any, sessions: int | None = None) -> dict[tuple[str, str], int] | None:
    """(protocol, state) -> count, from ``engine.table_summary()`` or ``engine.table()``."""
    summary = getattr(engine, "table_summary", None)
    if callable(summary):
        got = summary()
        if isinstance(got, Mapping):
            out: dict[tuple[str, str], int] = {}
            for k, v in got.items():
                if isinstance(k, tuple) and len(k) == 2:
                    out[(str(k[0]), str(k[1]))] = int(v)
            return out
    table = getattr(engine, "table", None)
    if not callable(table) or (sessions is not None and sessions > TABLE_WALK_LIMIT):
        return None
    counts: dict[tuple[str, str], int] = {}
    for e in table():
        key = (str(e.get("proto", "unknown")).lower(), str(e.get("state", "") or "none").lower())
        counts[key] = counts.get(key, 0) + 1
    return counts


class MasqdCollector:
    """prometheus_client collector over an engine object and :class:`OpsCounters`.

    ``engine_ref`` returns the current engine (or None before start) so a
    collector registered once follows an engine replaced by the run loop.
    """

    def __init__(
        self,
        engine_ref: Callable[[], Any],
        ops: OpsCounters,
        extra_counters: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._engine_ref = engine_ref
        self._ops = ops
        self._extra = extra_counters

    def describe(self) -> Iterable[Metric]:  # no up-front description: names depend on the engine
        return []

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_ref()
        families: dict[str, Metric] = {}
        label_names: dict[str, tuple[str, ...]] = {}

        def fam(rule_family: str, doc: str, labels: tuple[str, ...], kind: str) -> Metric:
            m = families.get(rule_family)
            if m is None:
                if kind == "gauge":
                    m = GaugeMetricFamily(rule_family, doc, labels=list(labels))
                else:
                    m = CounterMetricFamily(rule_family, doc, labels=list(labels))
                families[rule_family] = m
                label_names[rule_family] = labels
            return m

        def add(rule_family: str, doc: str, labels: dict[str, str], value: float, kind: str) -> None:
            names = tuple(sorted(labels))
            m = fam(rule_family, doc, names, kind)
            if label_names[rule_family] != names:
                # Same family reached with another label set: fill missing labels with "all".
                want = label_names[rule_family]
                labels = {k: labels.get(k, "all") for k in want}
            m.add_metric([labels[k] for k in label_names[rule_family]], value)  # type: ignore[attr-defined]

        seen_entries = False
        extra = dict(self._extra()) if self._extra is not None else {}
        if engine is not None or extra:
            counters = dict(_as_int_map(getattr(engine, "counters", None)))
            for k, v in extra.items():  # data-plane counters, same naming scheme
                counters[k] = counters.get(k, 0) + v
            for name, value in sorted(counters.items()):
                rule, labels = classify(name)
                if rule is None:
                    add(GENERIC_COUNTER, GENERIC_DOC, labels, float(value), "counter")
                    continue
                if rule.family == "masqd_masq_entries":
                    seen_entries = True
                add(rule.family, rule.doc, labels, float(value) * rule.scale, rule.kind)
            gauges = _as_int_map(getattr(engine, "gauges", None))
            for name, value in sorted(gauges.items()):
                rule, labels = classify(name)
                if rule is None:
                    add("masqd_engine_state", "Engine gauges without a dedicated family, by engine name.",
                        labels, float(value), "gauge")
                else:
                    if rule.family == "masqd_masq_entries":
                        seen_entries = True
                    add(rule.family, rule.doc, labels, float(value) * rule.scale, "gauge")
            if not seen_entries:
                sess = counters.get("sessions")
                summary = _entry_summary(engine, int(sess) if isinstance(sess, (int, float)) else None)
                if summary is not None:
                    for (proto, state), n in sorted(summary.items()):
                        add("masqd_masq_entries", "Masquerade entries by protocol and state.",
                            {"protocol": proto, "state": state}, float(n), "gauge")
                    if not summary:
                        families.setdefault(
                            "masqd_masq_entries",
                            GaugeMetricFamily("masqd_masq_entries", "Masquerade entries by protocol and state.",
                                              labels=["protocol", "state"]),
                        )
            for attr, metric in (("wan_ip", "masqd_wan_address_info"),):
                ip = getattr(engine, attr, None)
                if isinstance(ip, int) and ip:
                    addr = ".".join(str((ip >> s) & 255) for s in (24, 16, 8, 0))
                    add(metric, "Current WAN address (value 1).", {"address": addr}, 1.0, "gauge")
        yield from families.values()
        if engine is not None:
            yield from self._rule_metrics(engine)
            yield from self._offender_metrics(engine)
        yield from self._ops_metrics()

    @staticmethod
    def _offender_metrics(engine: Any) -> Iterator[Metric]:
        """The top offenders of the per-host limits, without a series per LAN host: the score is
        labelled by rank only (at most ``limits.top_offenders`` series, always the same), and which
        host holds a rank is an info-style series (value 1), joined on ``rank`` when wanted."""
        fn = getattr(engine, "host_limits", None)
        if not callable(fn):
            return
        rows = fn().get("top_offenders", [])
        score = GaugeMetricFamily("masqd_host_limit_top_score",
                                  "Refusals by a per-host limit of the host at this rank, decayed (half-life 60 s).",
                                  labels=["rank"])
        drops = GaugeMetricFamily("masqd_host_limit_top_drops",
                                  "Refusals by a per-host limit of the host at this rank since it was first seen.",
                                  labels=["rank"])
        info = GaugeMetricFamily("masqd_host_limit_top_info",
                                 "Which LAN host holds a rank of masqd_host_limit_top_score, and its main reason "
                                 "(value 1).", labels=["rank", "host", "reason"])
        for r in rows:
            rank = str(r["rank"])
            score.add_metric([rank], float(r["score"]))
            drops.add_metric([rank], float(r["drops"]))
            reasons = r.get("reasons") or {}
            main = max(reasons, key=lambda k: reasons[k]) if reasons else ""
            info.add_metric([rank, str(r["host"]), main], 1.0)
        yield score
        yield drops
        yield info

    @staticmethod
    def _rule_metrics(engine: Any) -> Iterator[Metric]:
        chains = getattr(getattr(engine, "rules", None), "chains", None)
        if not isinstance(chains, dict):
            return
        pk = CounterMetricFamily("masqd_rule_packets", "Packets matched per firewall rule (rule = position "
                                 "in its chain, 0 = the chain policy); a reload keeps the counts of rules that "
                                 "stay, whose position may change.",
                                 labels=["chain", "rule"])
        by = CounterMetricFamily("masqd_rule_bytes", "Bytes matched per firewall rule (see masqd_rule_packets).",
                                 labels=["chain", "rule"])
        for name, ch in chains.items():
            for i, r in enumerate(getattr(ch, "rules", [])):
                pk.add_metric([str(name), str(i + 1)], getattr(r, "pkts", 0))
                by.add_metric([str(name), str(i + 1)], getattr(r, "bytes", 0))
            if getattr(ch, "policy", None) is not None:
                pk.add_metric([str(name), "0"], getattr(ch, "pkts", 0))
                by.add_metric([str(name), "0"], getattr(ch, "bytes", 0))
        yield pk
        yield by

    def _ops_metrics(self) -> Iterator[Metric]:
        o = self._ops
        r = CounterMetricFamily("masqd_reloads", "Configuration reloads by result.", labels=["result"])
        r.add_metric(["success"], o.reloads_ok)
        r.add_metric(["failure"], o.reloads_failed)
        yield r
        g = GaugeMetricFamily("masqd_config_last_reload_successful", "1 if the last reload attempt succeeded.")
        g.add_metric([], 1.0 if o.last_reload_ok else 0.0)
        yield g
        g = GaugeMetricFamily("masqd_config_last_reload_timestamp_seconds",
                              "Unix time of the last successful (re)load.")
        g.add_metric([], o.last_reload_time)
        yield g
        c = CounterMetricFamily("masqd_control_requests", "Control socket requests by command.",
                                labels=["command"])
        for k, v in sorted(o.control_requests.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("masqd_control_errors", "Control socket requests refused, by reason.",
                                labels=["reason"])
        for k, v in sorted(o.control_errors.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("masqd_log_events", "Log events emitted, by event name.", labels=["event"])
        for k, v in sorted(o.log_emitted.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("masqd_log_events_suppressed",
                                "Log events suppressed by the rate limiter, by event name.", labels=["event"])
        for k, v in sorted(o.log_suppressed.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("masqd_capture_packets", "Packets written to pcap captures.",
                                labels=["interface"])
        for k, v in sorted(o.capture_packets.items()):
            c.add_metric([k], v)
        yield c
        ev = o.events
        g = GaugeMetricFamily("masqd_events_listeners", "Listeners of masqd events connected now.")
        g.add_metric([], float(ev.get("events_listeners", 0)))
        yield g
        for name, doc in (("events_sent", "Table events written to masqd events listeners."),
                          ("events_listeners_dropped", "masqd events listeners dropped because they "
                                                       "fell too far behind."),
                          ("events_lost", "Table events queued for listeners that were dropped."),
                          ("events_errors", "Table changes that could not be rendered as events.")):
            c = CounterMetricFamily(f"masqd_{name}", doc)
            c.add_metric([], float(ev.get(name, 0)))
            yield c
        lat = o.loop_latency
        acc = 0
        buckets: list[tuple[str, float]] = []
        for b, n in zip(lat.buckets, lat.counts, strict=True):
            acc += n
            buckets.append((repr(b), float(acc)))
        buckets.append(("+Inf", float(lat.total)))
        h = HistogramMetricFamily("masqd_loop_lag_seconds",
                                  "Event-loop scheduling lag measured by a periodic probe.",
                                  buckets=buckets, sum_value=lat.sum)
        yield h
        g = GaugeMetricFamily("masqd_start_time_seconds", "Unix time masqd started.")
        g.add_metric([], o.started)
        yield g


# --------------------------------------------------------------------------- HTTP


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv4 or [IPv6]) -> (host, port); ValueError with a reason."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics.listen {listen!r}: expected HOST:PORT")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"metrics.listen {listen!r}: port out of range")
    host = host.strip("[]") or "0.0.0.0"
    return host, p


class MetricsServer:
    """A minimal asyncio HTTP/1.0 server: GET <path> -> exposition text; /healthz -> ok."""

    def __init__(self, registry: CollectorRegistry, path: str = "/metrics") -> None:
        self.registry = registry
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self.scrapes = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"method not allowed\n", "text/plain")
                return
            target = parts[1].split("?", 1)[0]
            if target == self.path:
                self.scrapes += 1
                body = generate_latest(self.registry)
                await self._reply(writer, 200, body if parts[0] == "GET" else b"", CONTENT_TYPE_LATEST)
            elif target in ("/healthz", "/-/healthy"):
                await self._reply(writer, 200, b"ok\n", "text/plain")
            else:
                await self._reply(writer, 404, b"not found\n", "text/plain")
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "")
        head = (
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + body)
        await writer.drain()


def make_registry(collector: MasqdCollector) -> CollectorRegistry:
    """A private registry holding only masqd's collector (no process/platform noise)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)  # type: ignore[arg-type]
    return reg
