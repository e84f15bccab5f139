"""Draws bench/e2e.py's runs: one panel per kind of figure, bars per workload, masqd beside the kernel
(and the TUN/TAP floor, for runs made with ``--floor``).

Used by ``bench/e2e.py --plot FILE.svg`` (after its runs, or ``--from RESULTS.json`` for a
recorded file). Each bar is the median over the runs, its error bar the range (min - max).
matplotlib is the bench extra (``pip install -e .[bench]``; scripts/setup installs it): not a
dependency of masqd itself.
"""

from __future__ import annotations

import statistics
from typing import Any

# panel title -> [(bar label, masqd's key, the kernel's key)]
PANELS: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("TCP throughput (Gbit/s)", [("1 stream", "tcp1_masqd_gbps", "tcp1_kernel_gbps"),
                                 ("4 streams", "tcp4_masqd_gbps", "tcp4_kernel_gbps")]),
    ("Highest small-packet rate at < 0.1 % loss (kpps)", [
        ("UDP", "udp_max_masqd_pps", "udp_max_kernel_pps"),
        ("ESP", "esp_max_masqd_pps", "esp_max_kernel_pps"),
        ("GRE (PPTP)", "gre_max_masqd_pps", "gre_max_kernel_pps")]),
    ("CPU per forwarded 92-byte packet (µs)", [
        ("UDP", "udp_small_masqd_total_us_per_pkt", "udp_small_kernel_total_us_per_pkt"),
        ("ESP", "esp_masqd_total_us_per_pkt", "esp_kernel_total_us_per_pkt"),
        ("GRE", "gre_masqd_total_us_per_pkt", "gre_kernel_total_us_per_pkt")]),
    ("RTT at 100 Hz (ms)", [("median", "rtt_masqd_median_ms", "rtt_kernel_median_ms"),
                            ("p99", "rtt_masqd_p99_ms", "rtt_kernel_p99_ms")]),
]
SCALE = {"udp_max": 1e-3, "esp_max": 1e-3, "gre_max": 1e-3}


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    scale = next((v for k, v in SCALE.items() if key.startswith(k)), 1.0)
    return [float(r[key]) * scale for r in runs if isinstance(r.get(key), int | float) and r[key] == r[key]]


def plot(runs: list[dict[str, Any]], path: str, title: str) -> None:
    """Write the figure of ``runs`` (bench/e2e.py's result objects) to ``path`` (SVG, PNG...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [b for b in bars if _values(runs, b[1]) or _values(runs, b[2])]) for t, bars in PANELS]
    panels = [(t, bars) for t, bars in panels if bars]
    # the TUN/TAP floor (bench/e2e.py --floor) as a third bar where the runs have it: masqd's key
    # with "floor" for "masqd"
    series = [("masqd", "#2b6cb0"), ("kernel", "#a0aec0")]
    if any(_values(runs, km.replace("masqd", "floor")) for _t, bars in panels for _l, km, _k in bars):
        series.append(("TUN/TAP floor", "#dd6b20"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (ptitle, bars) in zip(axes[0], panels, strict=True):
        width = 0.76 / len(series)
        for j, (who, color) in enumerate(series):
            med, lo, hi = [], [], []
            for _label, km, kk in bars:
                key = {"masqd": km, "kernel": kk}.get(who, km.replace("masqd", "floor"))
                v = _values(runs, key) or [float("nan")]
                m = statistics.median(v)
                med.append(m)
                lo.append(m - min(v))
                hi.append(max(v) - m)
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(bars))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=who, color=color)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars])
        ax.set_title(ptitle, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"bench/e2e.py: masqd against the kernel's nftables masquerade, {len(runs)} run"
                 f"{'s' if len(runs) != 1 else ''} ({title}); bars: median, error bars: min - max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
