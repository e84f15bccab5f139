"""dataplane.keep_warm in a running masqd: the shadow exchange runs while traffic is recent,
stops when the router goes quiet, and leaves no trace in the real table or on any wire."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from masqd.lab import SRV1, Lab

pytestmark = pytest.mark.integration


def test_keep_warm_runs_with_traffic_and_stops_without(own_lab: Callable[[str, str], Lab]) -> None:
    lab = own_lab("tap", "w")
    m = lab.start_masqd(lab.masqd_config() + "\n[dataplane]\nkeep_warm = 0.001\n")
    # the shadow flow's far end must never appear on the WAN segment
    cap = lab.popen("isp", ["timeout", "20", "tcpdump", "-i", "eth0", "-n", "-l", "host", "198.51.100.77"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        snap = m.snapshot()
        assert snap["keep_warm"] == 0.001
        time.sleep(1.0)  # tcpdump listening
        out = lab.exec("lan2", ["ping", "-n", "-c", "100", "-i", "0.01", "-W", "1", SRV1]).stdout
        assert " 0% packet loss" in out, out
        snap = m.snapshot()
        runs = snap["counters"].get("keep_warm_runs", 0)
        # ~1 s of pings 10 ms apart, a run per quiet tick of the loop's millisecond clock (which
        # fires a 1 ms timer 0-1 ms after it is set): a thousand or two, where a spin makes 50 000+
        assert 100 < runs < 5000, runs
        assert all("198.51.100.77" not in str(row) for row in snap["table"]), snap["table"]
        time.sleep(1.5)  # quiet for longer than the keep-warm span
        quiet = m.snapshot()["counters"]["keep_warm_runs"]
        time.sleep(0.5)
        assert m.snapshot()["counters"]["keep_warm_runs"] == quiet
    finally:
        rc = m.stop()
        cap.terminate()
    seen = cap.communicate(timeout=10)[0]
    assert rc == 0, m.log()
    assert seen.strip() == "", seen
