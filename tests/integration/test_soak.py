"""bench/soak.py in its short mode: a minute of churning traffic from four LAN hosts with a reload
every 3 s (good and bad configurations in turn) and a WAN address change every 10 s.

The tool is the check (it runs the lab, the real masqd and the traffic); this
test runs it as the README says and holds its figures to bounds: every good
reload taken and every bad one refused, no loss of the steady probe flow
within a second after a reload (a reload must not drop packets), next to no
failed exchange outside the moments after an address change, no error in
masqd's log, RSS flat once warm, and the table back to zero entries after the
short timeouts the soak configures. The long soak (30 minutes) is run by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_a_minute_of_churn_reloads_and_address_changes_leaves_nothing_behind(
        root: None, stale_labs_removed: None, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    repo = Path(__file__).resolve().parents[2]
    cp = subprocess.run([sys.executable, str(repo / "bench" / "soak.py"), "--quick", "--json", str(out)],
                        capture_output=True, text=True, timeout=240, cwd=repo)
    assert out.exists(), cp.stdout[-3000:] + cp.stderr[-3000:]
    r = json.loads(out.read_text())
    report = cp.stdout[-3000:]
    assert r["masqd_alive"] and not r["masqd_log_errors"], report
    rel = r["reloads"]
    assert rel["good_sent"] >= 5 and rel["bad_sent"] >= 5, report
    assert (rel["taken"], rel["refused"]) == (rel["good_sent"], rel["bad_sent"]), report
    assert r["wan_changes"]["counted"] == r["wan_changes"]["sent"] >= 3, report
    w = r["probe"]["by_window"]
    assert w["reload"]["sent"] > 1000 and w["reload"]["lost"] == 0, report
    assert w["other"]["lost"] <= w["other"]["sent"] // 100, report
    ch = r["churn"]
    attempts = ch["tcp_ok"] + ch["tcp_fail"] + ch["udp_ok"] + ch["udp_fail"]
    assert attempts > 500 and not ch["errors"], report
    assert ch["failures_by_window"]["reload"] + ch["failures_by_window"]["other"] <= attempts // 100, report
    assert r["pings"]["received"] >= r["pings"]["sent"] * 0.98, report
    k = r["rss_kib"]
    assert k["end"] - k["after_warmup"] < 32 * 1024, report
    assert r["entries_end"] == 0 and r["table_drained_after_s"] is not None, report
    assert cp.returncode == 0, report
