"""The checks of the interop tests: what must hold after a scenario for it to pass.

A check takes the finished run (:class:`~.harness.scenario.ScenarioRun`: the
peers' results, the LAN/WAN captures, masqd's table and counters at the end)
and returns the problems it found, an empty list when all holds. The
builders here cover tunnels up, masquerade on the WAN capture, and masqd's own
table and counters; `dynaddr_checks` judges the WAN-address-change run.
"""

from __future__ import annotations

import ipaddress
import re

from masqd.lab import FW_WAN

from .harness.dynaddr import CLIENT, NEW_WAN_IP, DynaddrCheck, DynaddrRun
from .harness.scenario import Check, ScenarioRun


def clients_ok() -> Check:
    """Every client brought its tunnel up and pinged the host behind the far end."""

    def check(run: ScenarioRun) -> list[str]:
        problems = []
        for peer in run.clients():
            res = peer.result()
            if res.get("tunnel_rc") != "0":
                problems.append(
                    f"{peer.spec.name}: tunnel not up (tunnel_rc={res.get('tunnel_rc')})"
                )
            elif res.get("ping_rc") != "0":
                problems.append(
                    f"{peer.spec.name}: no traffic through the tunnel "
                    f"(ping_rc={res.get('ping_rc')}, received={res.get('ping_received')})"
                )
        return problems

    return check


def wan_has(bpf: str, at_least: int = 1, what: str = "") -> Check:
    """The WAN capture holds at least ``at_least`` packets matching ``bpf``."""

    def check(run: ScenarioRun) -> list[str]:
        n = len(run.wan_packets(bpf))
        if n < at_least:
            return [f"WAN capture: {n} packets '{bpf}' ({what}), wanted >= {at_least}"]
        return []

    return check


def wan_lacks(bpf: str, what: str = "") -> Check:
    """No packet on the WAN capture matches ``bpf``."""

    def check(run: ScenarioRun) -> list[str]:
        pkts = run.wan_packets(bpf)
        if pkts:
            return [f"WAN capture: {len(pkts)} packets '{bpf}' ({what}), e.g. {pkts[0]}"]
        return []

    return check


_ENDPOINT = re.compile(r" IP (\d+\.\d+\.\d+\.\d+)(?:\.(\d+))? > ")


def wan_source_endpoints(run: ScenarioRun, bpf: str) -> set[str]:
    """Distinct source ``addr[:port]`` of WAN packets matching ``bpf``."""
    out = set()
    for line in run.wan_packets(bpf):
        m = _ENDPOINT.search(line)
        if m:
            out.add(m.group(1) + (f":{m.group(2)}" if m.group(2) else ""))
    return out


def wan_distinct_sources(bpf: str, at_least: int, what: str = "") -> Check:
    """At least ``at_least`` distinct source endpoints among matching WAN packets."""

    def check(run: ScenarioRun) -> list[str]:
        srcs = wan_source_endpoints(run, bpf)
        if len(srcs) < at_least:
            return [f"WAN capture: sources of '{bpf}' ({what}) are {sorted(srcs)}, "
                    f"wanted >= {at_least} distinct"]  # fmt: skip
        return []

    return check


def masqueraded_by(public_ip: str = FW_WAN, lan: str = "10.0.0.0/8") -> Check:
    """The WAN shows traffic from ``public_ip`` and never a LAN address."""
    net = ipaddress.ip_network(lan)

    def check(run: ScenarioRun) -> list[str]:
        problems = wan_lacks(f"net {net}", "LAN addresses leaking to the WAN")(run)
        problems += wan_has(f"src host {public_ip}", 1, "masqueraded traffic")(run)
        return problems

    return check


def masqd_entries(proto: str, remote_port: int, at_least: int, public_ip: str = FW_WAN) -> Check:
    """masqd's own table (its state snapshot) holds ``at_least`` entries of ``proto``
    towards ``remote_port`` from distinct LAN endpoints, mapped to ``public_ip``:
    masqd (not the kernel) did the masquerade."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        lans = set()
        for entry in run.masqd_state.get("table", []):
            remote = str(entry.get("remote", ""))
            if (
                entry.get("proto") == proto
                and remote.endswith(f":{remote_port}")
                and str(entry.get("wan", "")).startswith(f"{public_ip}:")
            ):
                lans.add(entry.get("lan"))
        if len(lans) < at_least:
            return [f"masqd table: {len(lans)} {proto} entries to port {remote_port} "
                    f"({sorted(map(str, lans))}), wanted >= {at_least}"]  # fmt: skip
        return []

    return check


def natt_checks(clients: int) -> tuple[Check, ...]:
    """Tunnels up, masqueraded source, ESP-in-UDP 4500 from as many WAN ports as clients."""
    return (
        clients_ok(),
        masqueraded_by(),
        wan_has(f"src host {FW_WAN} and udp port 4500", 2 * clients, "NAT-T from masqd"),
        wan_distinct_sources(
            f"src host {FW_WAN} and udp dst port 4500", clients, "one NAT-T flow per client"
        ),
    )


def raw_esp_checks(clients: int) -> tuple[Check, ...]:
    """Tunnels up, masqueraded, ISAKMP 500<->500 and raw ESP (protocol 50) on the WAN."""
    return (
        clients_ok(),
        masqueraded_by(),
        wan_has(f"src host {FW_WAN} and udp src port 500 and udp dst port 500", 1, "ISAKMP"),
        wan_has(f"src host {FW_WAN} and ip proto 50", clients, "raw ESP from masqd"),
        wan_lacks("udp port 4500", "NAT-T must not be used"),
    )


def pptp_checks(clients: int) -> tuple[Check, ...]:
    """Tunnels up, masqueraded, TCP 1723 and GRE (protocol 47) on the WAN."""
    return (
        clients_ok(),
        masqueraded_by(),
        wan_distinct_sources(
            f"src host {FW_WAN} and tcp dst port 1723", clients, "PPTP control"
        ),
        wan_has(f"src host {FW_WAN} and ip proto 47", clients, "GRE from masqd"),
    )


def clients_result(key: str, value: str, names: tuple[str, ...] = ()) -> Check:
    """Every client (or the named ones) recorded ``key=value`` in its result.txt."""

    def check(run: ScenarioRun) -> list[str]:
        peers = [p for p in run.clients() if not names or p.spec.name in names]
        if names and len(peers) != len(names):
            return [f"clients {sorted(names)} wanted, found {[p.spec.name for p in peers]}"]
        return [f"{p.spec.name}: {key}={p.result().get(key)}, wanted {value}"
                for p in peers if p.result().get(key) != value]  # fmt: skip

    return check


def masqd_counter(name: str, at_least: int = 1, at_most: int | None = None) -> Check:
    """masqd's counter ``name`` (its state snapshot) is >= ``at_least`` (and <= ``at_most``)."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        got = int(run.masqd_state.get("counters", {}).get(name, 0))
        if got < at_least or (at_most is not None and got > at_most):
            want = f">= {at_least}" + (f" and <= {at_most}" if at_most is not None else "")
            return [f"masqd counters: {name}={got}, wanted {want}"]
        return []

    return check


def masqd_forward_hits(kind: str, lan: str, remote: str, at_least: int) -> Check:
    """masqd's table lists the forward (``kind`` portfw or protofw) to ``lan`` (``addr[:port]``)
    for ``remote`` (the protocol name: tcp, udp, esp, gre) with at least ``at_least`` hits."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        rows = [r for r in run.masqd_state.get("table", [])
                if r.get("proto") == kind and r.get("lan") == lan
                and str(r.get("remote")).lower() == remote]  # fmt: skip
        if not rows:
            return [f"masqd table: no {kind} row to {lan} ({remote})"]
        hits = sum(int(r.get("hits") or 0) for r in rows)
        if hits < at_least:
            return [f"masqd table: {kind} to {lan} ({remote}) has {hits} hits, wanted >= {at_least}"]
        return []

    return check


def forwarded_server_checks(lan_server: str, ports: tuple[tuple[str, int], ...], proto: str,
                            proto_number: int, remote_clients: int,
                            proto_forward_hits: bool = True) -> tuple[Check, ...]:
    """A server on ``lan_server`` behind masqd, reached by ``remote_clients`` remote peers:
    masqd's table shows the port forwards with hits and the protocol forward (with hits
    unless ``proto_forward_hits`` is false: a helper that tracks the calls, as PPTP's does,
    delivers their packets itself), its counters the connections, and the forwarded
    protocol leaves the WAN from masqd's address towards every remote client."""
    checks: list[Check] = [
        masqueraded_by(),
        masqd_counter("portfw_connections", remote_clients),
        masqd_forward_hits("protofw", lan_server, proto, remote_clients if proto_forward_hits else 0),
        wan_has(f"src host {FW_WAN} and ip proto {proto_number}", remote_clients,
                f"forwarded {proto} leaving from masqd"),
    ]  # fmt: skip
    if proto_forward_hits:
        checks.append(masqd_counter("protofw_packets", remote_clients))
    for pname, port in ports:
        checks.append(masqd_forward_hits("portfw", f"{lan_server}:{port}", pname, remote_clients))
    checks.append(_distinct_destinations(f"src host {FW_WAN} and ip proto {proto_number}",
                                          remote_clients, f"{proto} to each remote client"))
    return tuple(checks)


def masqd_pptp_calls(lan: str, forwarded: bool, count: int, masqueraded_ids: bool) -> Check:
    """masqd's table holds exactly ``count`` ESTABLISHED PPTP calls (GRE rows) of LAN host
    ``lan``: answered by a forwarded server (``forwarded``) or placed by a LAN client; with
    ``masqueraded_ids`` false the Call IDs were left as the LAN host chose them."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        rows = [r for r in run.masqd_state.get("table", [])
                if r.get("proto") == "gre" and str(r.get("lan", "")).split(":")[0] == lan
                and bool(r.get("inbound")) == forwarded]  # fmt: skip
        what = "forwarded-server" if forwarded else "LAN-client"
        problems = []
        if len(rows) != count or any(r.get("state") != "ESTABLISHED" for r in rows):
            problems.append(f"masqd table: {what} PPTP calls of {lan}: {rows}, wanted {count} ESTABLISHED")
        if not masqueraded_ids:
            problems += [f"masqd table: Call ID of a {what} call rewritten: {r}"
                         for r in rows if r.get("lan_call_id") != r.get("masq_call_id")]  # fmt: skip
        return problems

    return check


def masqd_esp_pairs(remote: str, lans: list[str]) -> Check:
    """masqd's IPsec masquerade paired an ESP SPI pair (ESTABLISHED) with ``remote`` for each
    LAN host in ``lans``."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        rows = [r for r in run.masqd_state.get("table", [])
                if r.get("proto") == "esp" and r.get("remote") == remote]  # fmt: skip
        have = {r.get("lan") for r in rows if r.get("state") in ("ESTABLISHED", "REPLACED")}
        return [f"masqd table: no ESP pair for {h} with {remote} (rows: {rows})"
                for h in lans if h not in have]  # fmt: skip

    return check


_DEST = re.compile(r" > (\d+\.\d+\.\d+\.\d+)")


def _distinct_destinations(bpf: str, at_least: int, what: str) -> Check:
    def check(run: ScenarioRun) -> list[str]:
        dsts = set()
        for line in run.wan_packets(bpf):
            m = _DEST.search(line)
            if m:
                dsts.add(m.group(1).rstrip(":"))
        if len(dsts) < at_least:
            return [f"WAN capture: destinations of '{bpf}' ({what}) are {sorted(dsts)}, "
                    f"wanted >= {at_least} distinct"]  # fmt: skip
        return []

    return check


def dynaddr_checks(max_tunnel_gap: float = 15.0) -> DynaddrCheck:
    """The WAN address change under load (:mod:`.harness.dynaddr`): a new TCP connection
    completes within 1 s of the change from the new address; the old stream is reset within
    2 s (RST seen on the LAN); the tunnel was up, carried pings before the change and again
    after it, down at most ``max_tunnel_gap`` seconds; masqd counted one address change and
    a reset sent, mapped nothing to the old address and the client's NAT-T to the new one."""

    def check(run: DynaddrRun) -> list[str]:
        problems = []
        p = run.probe
        if not p.get("ok") or str(p.get("seen", "")).split(":")[0] != NEW_WAN_IP:
            problems.append(f"new TCP connection after the change: {p}, wanted srv1 to see {NEW_WAN_IP}")
        elif p["after_change_s"] > 1.0:
            problems.append(f"new TCP connection completed {p['after_change_s']} s after the change, wanted <= 1 s")
        s = run.stream
        if s.get("end") != "reset":
            problems.append(f"old TCP stream ended with {s.get('end')!r}, wanted a reset (ECONNRESET)")
        elif s["after_change_s"] > 2.0:
            problems.append(f"old TCP stream reset {s['after_change_s']} s after the change, wanted <= 2 s")
        if not run.lan_resets:
            problems.append("LAN capture: no RST towards the streaming host")
        t = run.tunnel
        if t.get("tunnel_rc") != "0":
            problems.append(f"tunnel never came up: {t}")
        elif not t.get("replies_before_change"):
            problems.append(f"no echo replies through the tunnel before the change: {t}")
        elif not t.get("replies_after_change"):
            problems.append(f"the tunnel did not come back after the change: {t}")
        elif (t.get("longest_gap_s") or 0) > max_tunnel_gap:
            problems.append(f"the tunnel was down {t['longest_gap_s']} s, wanted <= {max_tunnel_gap} s")
        c = (run.masqd_state or {}).get("counters", {})
        if int(c.get("wan_address_changes", 0)) != 1:
            problems.append(f"masqd counters: wan_address_changes={c.get('wan_address_changes')}, wanted 1")
        if int(c.get("tcp_resets_sent", 0)) < 1:
            problems.append(f"masqd counters: tcp_resets_sent={c.get('tcp_resets_sent')}, wanted >= 1")
        rows = (run.masqd_state or {}).get("table", [])
        old = [r for r in rows if str(r.get("wan", "")).startswith(f"{FW_WAN}:")]
        if old:
            problems.append(f"masqd table still maps to the old address: {old[:3]}")
        natt = [r for r in rows if r.get("proto") == "udp" and str(r.get("lan")) == f"{CLIENT}:4500"
                and str(r.get("wan", "")).startswith(f"{NEW_WAN_IP}:")]
        if not natt:
            problems.append(f"masqd table: no NAT-T entry of {CLIENT} on {NEW_WAN_IP}")
        return problems

    return check
