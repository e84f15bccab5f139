"""The scenario checks judge real captures and masqd snapshots; the image build says how far it
has come (no guests needed)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from .checks import masqd_entries, masqueraded_by, wan_distinct_sources
from .harness import images
from .harness.images import (
    IMAGES,
    Progress,
    debian_mirror_and_suite,
    ensure_images,
    follow,
    is_current,
    stamp_for,
)
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


def _debootstrap_output(packages: int, required: int) -> list[str]:
    """What debootstrap prints for a tree of ``packages`` (``required`` of them installed first)."""
    names = [f"lib{i}-x" for i in range(packages)]
    lines = ["I: Retrieving InRelease ", "I: Checking Release signature", "I: Retrieving Packages ",
             "I: Validating Packages ", "I: Resolving dependencies of required packages..."]
    lines += [x for n in names for x in (f"I: Retrieving {n} 1.2-3+b1", f"I: Validating {n} 1.2-3+b1")]
    lines += ["I: Chosen extractor for .deb packages: dpkg-deb"]
    lines += [f"I: Extracting {n}..." for n in names[:required]]
    lines += ["I: Installing core packages...", "I: Unpacking required packages..."]
    lines += [f"I: Unpacking {n}..." for n in names[:required]]
    lines += ["I: Configuring required packages..."] + [f"I: Configuring {n}..." for n in names[:required]]
    lines += ["I: Unpacking the base system..."] + [f"I: Unpacking {n}..." for n in names[required:]]
    lines += ["I: Configuring the base system..."] + [f"I: Configuring {n}..." for n in names[required:]]
    return lines + ["I: Base system installed successfully."]


def test_image_build_says_each_step_and_how_far() -> None:
    """debootstrap's 900 lines over 15 minutes become a line per step and, inside a step, a
    line at most every 15 s saying how far it has come (never 15 s of silence while it runs);
    debootstrap's own output still goes to its log in full."""
    lines = _debootstrap_output(120, 80)
    now = [0.0]
    said: list[tuple[float, str]] = []
    progress = Progress("strongswan", lambda line: said.append((now[0], line)), every=15.0,
                        clock=lambda: now[0])

    def one_a_second() -> Iterator[str]:
        for line in lines:
            now[0] += 1.0
            yield line + "\n"

    progress.step(1, "debootstrap bookworm: downloading packages")
    log = io.StringIO()
    follow(one_a_second(), log, progress)
    assert log.getvalue() == "".join(line + "\n" for line in lines)
    texts = [text for _t, text in said]
    assert texts[0] == "strongswan [1/4] debootstrap bookworm: downloading packages"
    assert "strongswan [2/4] debootstrap: installing 120 packages" in texts
    step2 = texts.index("strongswan [2/4] debootstrap: installing 120 packages")
    assert all(t.startswith("strongswan [1/4] downloaded ") for t in texts[1:step2])
    downloaded = [int(t.split()[3]) for t in texts[1:step2]]
    assert downloaded == sorted(downloaded) and 0 < downloaded[-1] <= 120
    installing = [t.removeprefix("strongswan [2/4] ") for t in texts[step2 + 1:]]
    counts = [[int(c.split()[0]) for c in t.removesuffix(" of 120 packages").split(", ")] for t in installing]
    assert all(t.endswith(" of 120 packages") for t in installing) and len(counts) > 3
    assert all(x <= y for a, b in zip(counts, counts[1:], strict=False) for x, y in zip(a, b, strict=True))
    assert counts[-1][0] == 80  # extracted: the required packages; unpacked, configured: all
    assert counts[-1][2] > 100
    times = [t for t, _text in said]
    assert all(b - a >= 15 for a, b in zip(times[1:step2], times[2:step2], strict=False))
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= 15 + 2  # no long silence
    assert len(said) < len(lines) / 10


def test_warm_image_cache_says_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trees built from the current recipe are reused: nothing is built, one line is said,
    and the guest init files are refreshed in every tree."""
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path)
    _mirror, suite = debian_mirror_and_suite()
    for img in IMAGES.values():
        (tmp_path / img.name / "sbin").mkdir(parents=True)
        img.stamp_path.write_text(stamp_for(img, suite) + "\n")
    paths = ensure_images()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("interop-setup: images ready in "), out
    assert paths == {name: tmp_path / name for name in IMAGES}
    assert all((tmp_path / name / "sbin" / "masqd-guest-init").exists() for name in IMAGES)

