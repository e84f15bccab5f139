"""``masqd rules check`` and the ``ipchains -L`` style listing (``format_rules``)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from masqd.cli import main
from masqd.firewall import compile_text, format_rules
from masqd.firewall.parse import Env
from masqd.rulescheck import rules_check, rules_list

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"

STRICT = """\
ipchains -P input DENY
ipchains -P output DENY
ipchains -P forward DENY
ipchains -A input -j ACCEPT -s 10.0.0.0/8 -d 0.0.0.0/0 -i eth0
ipchains -A forward -j MASQ -p udp -s 10.0.0.2/32 500 -d 198.51.100.1/32 500 -i ppp0
ipchains -A output -j ACCEPT -p tcp -s 203.0.113.0/24 -d 198.51.100.1/32 1723 -i ppp0
"""


def test_check_good_file_lists_normalised_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "strict.rules"
    f.write_text(STRICT)
    assert rules_check([str(f)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        "Chain input (policy DENY):",
        "target     prot  opt    ifname     source                destination           ports",
        "ACCEPT     all   --     lan        10.0.0.0/8            0.0.0.0/0             n/a",
        "",
        "Chain forward (policy DENY):",
        "target     prot  opt    ifname     source                destination           ports",
        "MASQ       udp   --     wan        10.0.0.2              198.51.100.1          500 ->   500",
        "",
        "Chain output (policy DENY):",
        "target     prot  opt    ifname     source                destination           ports",
        "ACCEPT     tcp   --     wan        203.0.113.0/24        198.51.100.1          * ->   1723",
    ]


def test_check_bad_file_prints_every_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.rules"
    f.write_text(STRICT + "ipchains -A input -j MASQ\n\nipfwadm -0 -a accept -P all\nipchains -A forward -i eth5 -j MASQ\n")
    assert rules_check([str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{f}:7: MASQ is only allowed in the forward chain, not in input",
        f"{f}:9: unknown option '-0' (a zero): did you mean -O (letter O, not zero)?",
        f"{f}:10: unknown interface 'eth5' (known: eth0=lan, eth1=wan, ippp+=wan, ppp+=wan, slip+=wan; map it in firewall.aliases)",
    ]


def test_map_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "m.rules"
    f.write_text("ipchains -A input -i eth5 -j DENY\nipfwadm -I -a deny -W eth1 -V 200.200.200.200\n")
    assert rules_check([str(f)]) == 2
    capsys.readouterr()
    assert rules_check([str(f), "--map", "eth5=lan,200.200.200.200=wan"]) == 0
    out, _ = capsys.readouterr()
    assert "DENY       all   --     lan" in out and "DENY       all   --     wan" in out
    assert rules_check([str(f), "--map", "eth5=dmz"]) == 2
    _, err = capsys.readouterr()
    assert "--map: bad entry 'eth5=dmz' (expected NAME=lan or NAME=wan)" in err


def test_config_option_and_toml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "200.200.200.200/24"\n'
                   '[firewall]\ninput_policy = "DENY"\naliases = { "isdn0" = "wan" }\n')
    f = tmp_path / "r.rules"
    f.write_text("ipfwadm -I -a accept -V 200.200.200.200 -W isdn0\n")
    assert rules_check([str(f)]) == 2
    capsys.readouterr()
    assert rules_check([str(f), "--config", str(cfg)]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("Chain input (policy DENY):")
    # a .toml argument is checked as a whole config
    assert rules_check([str(EXAMPLES / "client-strict-structured.toml")]) == 0
    out, _ = capsys.readouterr()
    assert "MASQ       gre   --     wan        10.0.0.2              198.51.100.1          n/a" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
                   '[firewall]\nrules = "ipchains -A output -j MASQ"\n')
    assert rules_check([str(bad)]) == 2
    _, err = capsys.readouterr()
    assert err == f"{bad}: firewall.rules:1: MASQ is only allowed in the forward chain, not in output\n"


def test_usage_and_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert rules_check([]) == 2
    assert rules_check([str(tmp_path / "nope.rules")]) == 2
    _, err = capsys.readouterr()
    assert f"{tmp_path / 'nope.rules'}: cannot read: No such file or directory" in err
    (tmp_path / "bin.rules").write_bytes(b"\xff\xfe\x00garbage")
    assert rules_check([str(tmp_path / "bin.rules")]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("ipfwd --masq 10.0.0.2 gre &\n"))
    assert rules_check(["-"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[-2:] == ["prot  host", "gre   10.0.0.2"]


def test_masqd_cli_dispatches_rules_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(EXAMPLES / "wide-open-ipchains.rules")]) == 0
    out, _ = capsys.readouterr()
    assert "Chain forward (policy MASQ):" in out


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.rules")))
def test_every_example_checks_clean(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert rules_check([str(EXAMPLES / name)]) == 0


def test_verbose_listing_shows_counters_like_ipchains_v() -> None:
    rs, errors = compile_text(
        "ipchains -N vpn\nipchains -A vpn -p 50 -j ACCEPT\nipchains -A input -s 198.51.100.1 -j vpn -l\n"
        "ipchains -A input -p tcp -y -j REJECT\nipportfw -A -u ${4}/500 -R 10.0.0.2/500 -p 5\n",
        "v", Env(),
    )
    assert errors == [] and rs is not None
    rs.evaluate("input", "wan", 50, 0xC6336401, 1, 0, 0, 0).account(1400)
    rs.evaluate("input", "wan", 50, 0xC6336401, 1, 0, 0, 0).account(100)
    rs.evaluate("input", "wan", 17, 0x01010101, 1, 0, 0, 0).account(60)
    text = format_rules(rs, verbose=True)
    assert text == rules_list(rs)
    assert text.splitlines() == [
        "Chain input (policy ACCEPT: 1 packets, 60 bytes):",
        "    pkts      bytes target     prot  opt    ifname     source                destination           ports",
        "       2       1500 vpn        all   l      *          198.51.100.1          0.0.0.0/0             n/a",
        "       0          0 REJECT     tcp   y      *          0.0.0.0/0             0.0.0.0/0             * ->   *",
        "",
        "Chain forward (policy MASQ: 0 packets, 0 bytes):",
        "    pkts      bytes target     prot  opt    ifname     source                destination           ports",
        "",
        "Chain output (policy ACCEPT: 0 packets, 0 bytes):",
        "    pkts      bytes target     prot  opt    ifname     source                destination           ports",
        "",
        "Chain vpn (1 references):",
        "    pkts      bytes target     prot  opt    ifname     source                destination           ports",
        "       2       1500 ACCEPT     esp   --     *          0.0.0.0/0             0.0.0.0/0             n/a",
        "",
        "Port forwards:",
        "prot  localaddr         lport  rediraddr         rport  pref",
        "UDP   wan                 500  10.0.0.2            500     5",
    ]
    rs.zero()
    assert "       0          0 vpn" in format_rules(rs)
