"""The scenario checks judge real captures and masqd snapshots (no guests needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from .checks import masqd_entries, masqueraded_by, wan_distinct_sources
from .harness import images
from .harness.images import IMAGES, debian_mirror_and_suite, is_current, stamp_for
from .harness.peers import PeerSpec
from .harness.router import to_toml
from .harness.scenario import Scenario, ScenarioRun

pytestmark = pytest.mark.interop


def _run(tmp_path: Path, packets: list[tuple[str, int, str, int]]) -> ScenarioRun:
    frames = [
        Ether() / IP(src=s, dst=d) / UDP(sport=sp, dport=dp) / b"x" for s, sp, d, dp in packets
    ]
    wan = tmp_path / "wan.pcap"
    wrpcap(str(wan), frames)
    spec = PeerSpec("c1", "strongswan", "lan", "10.0.0.11/8", "10.0.0.1", "client", "")
    run = ScenarioRun(Scenario("t", (spec,)), "mitest", tmp_path)
    run.pcaps["wan"] = wan
    return run


def test_masquerade_checks_see_leaks_and_flows(tmp_path: Path) -> None:
    good = _run(tmp_path, [("203.0.113.200", 4500, "198.51.100.10", 4500),
                           ("203.0.113.200", 1025, "198.51.100.10", 4500)])  # fmt: skip
    assert masqueraded_by()(good) == []
    assert wan_distinct_sources("udp dst port 4500", 2)(good) == []
    assert wan_distinct_sources("udp dst port 4500", 3)(good) != []
    leak = _run(tmp_path, [("10.0.0.11", 4500, "198.51.100.10", 4500)])
    problems = masqueraded_by()(leak)
    assert any("LAN addresses" in p for p in problems)
    assert any("masqueraded traffic" in p for p in problems)


def test_masqd_entries_reads_the_snapshot(tmp_path: Path) -> None:
    run = _run(tmp_path, [])
    assert masqd_entries("udp", 4500, 1)(run) != []  # no snapshot at all
    run.masqd_state = {"table": [
        {"proto": "udp", "lan": "10.0.0.11:4500", "wan": "203.0.113.200:4500",
         "remote": "198.51.100.10:4500"},
        {"proto": "udp", "lan": "10.0.0.12:4500", "wan": "203.0.113.200:1024",
         "remote": "198.51.100.10:4500"},
    ]}  # fmt: skip
    assert masqd_entries("udp", 4500, 2)(run) == []
    assert masqd_entries("udp", 4500, 3)(run) != []
    assert masqd_entries("udp", 500, 1)(run) != []


def test_image_stamp_changes_with_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path)
    img = IMAGES["strongswan"]
    _mirror, suite = debian_mirror_and_suite()
    (tmp_path / "strongswan" / "sbin").mkdir(parents=True)
    assert not is_current(img, suite)  # no stamp yet
    img.stamp_path.write_text(stamp_for(img, suite) + "\n")
    assert is_current(img, suite)
    monkeypatch.setattr(images, "IMAGE_VERSION", 999)
    assert not is_current(img, suite)  # recipe changed: rebuild


def test_masqd_config_is_valid_toml_for_masqd() -> None:
    from masqd.config import loads

    doc = {"lan": {"name": "x-mlan", "mode": "tap", "address": "10.0.0.1/8", "netns": "x-sw",
                   "bridge": "br-lan"},
           "wan": {"name": "x-mwan", "mode": "tap", "address": "203.0.113.200/24",
                   "gateway": "203.0.113.1", "netns": "x-sw", "bridge": "br-wan"},
           "masquerade": {"timeouts": {"udp": 30.0}}}  # fmt: skip
    cfg = loads(to_toml(doc), "interop")
    assert cfg.wan.bridge == "br-wan" and cfg.masquerade.effective_timeouts.udp == 30.0

