"""deploy/: Prometheus config and alert rules pass promtool (with unit tests); the Grafana
dashboard and the alerts only use metric names that masqd exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prometheus_client import generate_latest

from masqd.ops.metrics import (
    COUNTER_RULES,
    GENERIC_COUNTER,
    MasqdCollector,
    OpsCounters,
    make_registry,
)

from .fake_engine import FakeEngine

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


def exported_names() -> set[str]:
    names = set()
    for rule in COUNTER_RULES:
        names.add(rule.family + ("_total" if rule.kind == "counter" else ""))
    names.add(GENERIC_COUNTER + "_total")
    text = generate_latest(make_registry(MasqdCollector(FakeEngine, OpsCounters()))).decode()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_prometheus_config_valid() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_unit_tests_pass() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def _metric_refs(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\b(masqd_[a-z0-9_]+)", e)}


def test_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana/dashboards/masqd.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    refs = _metric_refs(exprs)
    known = exported_names()
    assert refs and refs <= known, refs - known
    # every SPEC 7 metric area has a panel
    for needed in ("masqd_packets_total", "masqd_bytes_total", "masqd_drops_total", "masqd_masq_entries",
                   "masqd_port_pool_used_ports", "masqd_esp_events_total", "masqd_pptp_calls_total",
                   "masqd_reloads_total", "masqd_wan_address_changes_total",
                   # the reader threads' stops (docs/dataplane.md)
                   "masqd_dataplane_reader_stops_total", "masqd_dataplane_reader_stopped_seconds_total"):
        assert needed in refs, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_use_only_exported_metrics() -> None:
    text = (DEPLOY / "alerts.yml").read_text()
    exprs = re.findall(r"expr: (.*)", text)
    refs = _metric_refs(exprs)
    assert refs and refs <= exported_names(), refs - exported_names()


def test_compose_file_wires_the_three_networks() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    for needle in ("cap_add: [NET_ADMIN]", "/dev/net/tun", "MASQD_LAN_SUBNET: 10.88.0.0/24",
                   "MASQD_WAN_SUBNET: 203.0.113.0/24", "10.89.0.2", "./prometheus.yml", "./alerts.yml",
                   "./grafana/dashboards"):
        assert needle in text, needle
    assert "192.0.2." not in text
    assert '"10.89.0.2:9598"' in (DEPLOY / "prometheus.yml").read_text()
