"""Rule scripts of the ipchains era as written (issue 23): service names, loopback rules,
interface wildcards, TOS masks, ipfwadm -k, masquerade timeouts, ICMP names, forwards on
other addresses. Every line here was written for these tests."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from masqd.config import ConfigError, loads
from masqd.firewall import ACCEPT, DENY, FLAG_ACK, FLAG_SYN, build_ruleset, compile_text
from masqd.firewall.parse import Env
from masqd.firewall.ruleset import Ruleset
from masqd.firewall.services import Services, load
from masqd.firewall.values import ICMP_TYPES
from masqd.rulescheck import rules_check

TCP, UDP, ICMP = 6, 17, 1
BUILTIN = Services.builtin()


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def env(**kw: object) -> Env:
    e = Env(lan_ip=ip("10.0.0.1"), wan_ip=ip("203.0.113.200"), services=BUILTIN)
    for k, v in kw.items():
        setattr(e, k, v)
    return e


def build(text: str, e: Env | None = None) -> Ruleset:
    rs, errors = compile_text(text, "s.rules", e or env())
    assert errors == [], errors
    assert rs is not None
    return rs


def errors_of(text: str, e: Env | None = None) -> list[str]:
    rs, errors = compile_text(text, "s.rules", e or env())
    assert (rs is None) == bool(errors)
    return errors


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    f = tmp_path / "s.rules"
    f.write_text(text)
    rc = rules_check([str(f), *extra])
    out, err = capsys.readouterr()
    return rc, out, err.replace(f"{f}:", "s.rules:")


# ------------------------------------------------------------------ service names


def test_service_names_resolve_per_protocol_like_getservbyname() -> None:
    rs = build(
        "ipchains -A input -p tcp -s 0/0 -d 203.0.113.200 finger -j DENY\n"
        "ipchains -A input -p tcp -d 0/0 exec:login -j DENY\n"
        "ipchains -A input -p tcp -d 0/0 pop-3 -j ACCEPT\n"
        "ipchains -A input -p tcp --dport nntp -j ACCEPT\n"
        "ipchains -A input -p udp --sport domain --dport ntp -j ACCEPT\n"
        "ipfwadm -I -a accept -P tcp -S 0/0 -D 0/0 ftp-data ssh telnet smtp\n"
    )
    dports = [r.dports for r in rs.chains["input"].rules]
    assert dports == [((79, 79),), ((512, 513),), ((110, 110),), ((119, 119),), ((123, 123),),
                      ((20, 20), (22, 22), (23, 23), (25, 25))]
    assert rs.chains["input"].rules[4].sports == ((53, 53),)


def test_unknown_service_names_are_refused_with_the_database_named() -> None:
    db = Services.from_text("only-here 4242/tcp\n", "/x/services")
    assert errors_of("ipchains -A input -p tcp --dport no-such-service -j DENY", env(services=db)) == [
        "s.rules:1: unknown tcp service 'no-such-service' (not in /x/services)"
    ]
    # exec is TCP only in the services database: a UDP rule cannot name it
    assert errors_of("ipchains -A input -p udp --dport exec -j DENY") == [
        f"s.rules:1: unknown udp service 'exec' (not in {BUILTIN.source})"
    ]
    assert build("ipchains -A input -p tcp --dport only-here -j DENY", env(services=db)).chains["input"].rules[0].dports == (
        (4242, 4242),
    )


def test_host_services_file_is_used_when_present_else_the_built_in_table(tmp_path: Path) -> None:
    f = tmp_path / "services"
    f.write_text("# a host's own table\nmy-app\t7777/udp\tmyapp # comment\nmy-app 7778/tcp\n")
    db = load(str(f))
    assert db.source == str(f)
    assert (db.port("my-app", "udp"), db.port("myapp", "udp"), db.port("my-app", "tcp")) == (7777, 7777, 7778)
    assert db.port("finger", "tcp") is None  # the host's file is the whole database
    missing = load(str(tmp_path / "absent"))
    assert missing.source.startswith("built-in table") and missing.port("finger", "tcp") == 79
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    assert load(str(empty)).source.startswith("built-in table")


def test_built_in_table_covers_every_tcp_and_udp_name_of_netbase() -> None:
    host = "/etc/services"
    if not os.path.exists(host):
        pytest.skip("no /etc/services on this host to compare with")
    netbase = load(host)
    wanted = {k: v for k, v in netbase.ports.items() if k[1] in ("tcp", "udp")}
    assert len(wanted) > 300
    assert {k: BUILTIN.ports.get(k) for k in wanted} == wanted
    # and the IANA registry beyond it
    assert BUILTIN.port("xmpp-client", "tcp") == 5222 and len(BUILTIN.ports) > 10_000


# ------------------------------------------------------------------ loopback


LOOPBACK_RULES = """\
ipchains -A input -i lo -j ACCEPT
ipchains -A input -s 127.0.0.0/8 -i ! lo -j DENY -l
ipchains -A output -i lo -j ACCEPT
ipfwadm -I -a accept -V 127.0.0.1 -W lo
ipfwadm -O -a accept -V 127.0.0.1
ipchains -A input -p tcp -d 0/0 www -i eth1 -j ACCEPT
"""


def test_loopback_rules_are_kept_listed_counted_and_never_match() -> None:
    rs = build(LOOPBACK_RULES)
    inp = rs.chains["input"].rules
    assert [r.iface_str() for r in inp] == ["lo", "!lo", "lo", "wan"]
    assert str(inp[1]) == "-A input -s 127.0.0.0/8 -i ! lo -j DENY -l"
    for iface in ("lan", "wan"):
        d = rs.evaluate("input", iface, TCP, ip("198.51.100.1"), ip("203.0.113.200"), 1025, 80, FLAG_ACK)
        d.account(60)
        assert d.verdict == ACCEPT
        # a spoofed loopback source arriving on a real side: "! lo" matches it
        d = rs.evaluate("input", iface, UDP, ip("127.0.0.1"), ip("203.0.113.200"), 9, 9, 0)
        d.account(40)
        assert d.verdict == DENY and d.rules == (inp[1],)
    assert [r.pkts for r in inp] == [0, 2, 0, 1]
    assert [r.pkts for r in rs.chains["output"].rules] == [0, 0]
    assert len(rs.warnings) == 1 and rs.warnings[0].startswith("s.rules:1: 5 rule(s) name the loopback interface lo")


def test_rules_check_accepts_loopback_rules_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = check(tmp_path, LOOPBACK_RULES, capsys)
    assert rc == 0
    assert err.splitlines() == [
        "s.rules:1: warning: 5 rule(s) name the loopback interface lo (-i lo, -V 127.0.0.1): masqd routes "
        "between its LAN and WAN only and has no loopback side, so they are kept, listed and counted, but "
        "'-i lo' never matches and '-i ! lo' matches every packet"
    ]
    assert "ACCEPT     all   --     lo         0.0.0.0/0" in out
    assert "DENY       all   l      !lo        127.0.0.0/8" in out


def test_loopback_with_another_side_on_one_ipfwadm_line_is_refused() -> None:
    assert errors_of("ipfwadm -I -a accept -W eth1 -V 127.0.0.1") == [
        "s.rules:1: -W eth1 and -V 127.0.0.1 name different interfaces"
    ]


# ------------------------------------------------------------------ interface wildcards


def test_dial_up_names_and_wildcards_default_to_the_wan_side() -> None:
    rs = build(
        "ipchains -A input -i ppp+ -j DENY\nipchains -A input -i ppp3 -j DENY\n"
        "ipchains -A input -i slip0 -j DENY\nipchains -A input -i slip+ -j DENY\n"
        "ipchains -A input -i ippp1 -j DENY\nipfwadm -I -a deny -W ippp+\n"
        "ipchains -A input -i eth0 -j ACCEPT\nipchains -A input -i eth+ -j ACCEPT\n"
    )
    assert [r.iface_str() for r in rs.chains["input"].rules] == ["wan"] * 6 + ["lan", "lan+wan"]


def test_config_wildcard_aliases_add_to_the_defaults_and_the_longest_wins() -> None:
    cfg = loads(
        '[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
        '[firewall]\naliases = { "tun+" = "lan", "ppp9+" = "lan" }\n'
        'rules = """\nipchains -A input -i tun4 -j ACCEPT\nipchains -A input -i ppp91 -j ACCEPT\n'
        'ipchains -A input -i ppp1 -j DENY\n"""\n'
    )
    assert [r.iface_str() for r in build_ruleset(cfg).chains["input"].rules] == ["lan", "lan", "wan"]


# ------------------------------------------------------------------ TOS


def test_tos_masks_are_parsed_listed_and_round_trip() -> None:
    rs = build(
        "ipchains -A output -p tcp -d 0/0 telnet -t 0x01 0x10\n"
        "ipchains -A forward -p tcp -s 0/0 ftp-data -t 01 08 -j MASQ\n"
        "ipfwadm -F -a accept -m -P tcp -D 0/0 ssh -t 0x01 0x10\n"
    )
    out, fwd = rs.chains["output"].rules, rs.chains["forward"].rules
    assert (out[0].tos_and, out[0].tos_xor) == (0x01, 0x10) and out[0].target == ""
    assert str(out[0]) == "-A output -p tcp -d 0.0.0.0/0 23 -t 0x01 0x10"
    assert [r.tos for r in fwd] == [(0x01, 0x08), (0x01, 0x10)]
    assert build(f"ipchains {out[0]}").chains["output"].rules[0].key() == out[0].key()
    d = rs.evaluate("forward", "wan", TCP, ip("10.0.0.2"), ip("198.51.100.1"), 20, 4000, FLAG_ACK)
    assert d.tos == (0x01, 0x08) and not d.cache  # a rewrite is per packet: never cached for the flow


@pytest.mark.parametrize(("masks", "error"), [
    ("0x00 0x10", "TOS masks 0x00 0x10 would change bit 0 (RFC 1349): the AND mask must keep it (be odd) "
                  "and the XOR mask leave it (be even)"),
    ("0x01 0x11", "TOS masks 0x01 0x11 would change bit 0 (RFC 1349): the AND mask must keep it (be odd) "
                  "and the XOR mask leave it (be even)"),
    ("0x01 0x18", "TOS masks 0x01 0x18 always set more than one TOS bit (RFC 1349 allows one)"),
    ("0x1g 0x10", "bad TOS mask '0x1g': a hex byte such as 0x01 or 0x10"),
    ("0x101 0x10", "bad TOS mask '0x101': a hex byte such as 0x01 or 0x10"),
    ("0x01", "-t needs two hex bytes: ANDMASK XORMASK"),
])
def test_tos_masks_get_ipchains_checks(masks: str, error: str) -> None:
    assert errors_of(f"ipchains -A forward -p tcp -t {masks} -j MASQ") == [f"s.rules:1: {error}"]


def test_tos_masks_that_may_set_two_bits_are_accepted_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = check(tmp_path, "ipchains -A forward -p udp -t 0x1f 0x02 -j MASQ\n", capsys)
    assert rc == 0 and "TOS 0x1f/0x02" in out
    assert err.splitlines() == [
        "s.rules:1: warning: TOS masks 0x1f 0x02 may set more than one TOS bit for packets with TOS "
        "Minimize-Delay (0x10), Maximize-Throughput (0x08), Maximize-Reliability (0x04)"
    ]
    # a refused line leaves no warning behind
    rc, out, err = check(tmp_path, "ipchains -A forward -p udp -t 0x1f 0x02 -j accept\n", capsys)
    assert rc == 2 and "warning" not in err


# ------------------------------------------------------------------ ipfwadm -k


def test_ipfwadm_k_matches_tcp_with_ack_set() -> None:
    rs = build("ipfwadm -I -a accept -P tcp -k -W eth1 -D 203.0.113.200 1024:65535\nipfwadm -I -a deny -P tcp -W eth1\n")
    r = rs.chains["input"].rules[0]
    assert r.ack == 1 and r.opt_str() == "k" and "-k" in r.spec()
    ev = rs.evaluate
    wan = ip("203.0.113.200")
    assert ev("input", "wan", TCP, ip("198.51.100.1"), wan, 80, 40000, FLAG_ACK).verdict == ACCEPT
    assert ev("input", "wan", TCP, ip("198.51.100.1"), wan, 80, 40000, 0).verdict == DENY
    assert ev("input", "wan", TCP, ip("198.51.100.1"), wan, 80, 40000, FLAG_SYN).verdict == DENY
    assert errors_of("ipfwadm -I -a accept -P udp -k") == ["s.rules:1: -k (ACK) needs -P tcp"]
    assert errors_of("ipfwadm -I -a accept -P tcp -k -y") == [
        "s.rules:1: -y and -k together never match (-y is SYN without ACK)"
    ]


# ------------------------------------------------------------------ masquerade timeouts


def test_masquerade_timeouts_from_ipchains_and_ipfwadm_lines() -> None:
    assert build("ipchains -M -S 3600 30 90").timeouts == {"tcp_established": 3600, "tcp_fin": 30, "udp": 90}
    assert build("ipchains -S 0 0 45").timeouts == {"udp": 45}  # 0 keeps; -M may be left out
    assert build("ipchains --masquerading --set 100 0 0").timeouts == {"tcp_established": 100}
    assert build("ipfwadm -M -s 500 0 0\nipfwadm -M -s 0 12 0").timeouts == {"tcp_established": 500, "tcp_fin": 12}
    assert errors_of("ipchains -M -S 10 20") == [
        "s.rules:1: masquerade timeouts take 3 values: TCP TCPFIN UDP (seconds, 0 keeps the current one)"
    ]
    assert errors_of("ipfwadm -M -s 10 x 30") == ["s.rules:1: bad timeout 'x': whole seconds from 0 to 21474836"]
    assert errors_of("ipchains -M -L") == ["s.rules:1: ipchains -M -L is not supported in a rules file"]
    assert errors_of("ipfwadm -M -l") == ["s.rules:1: ipfwadm -M -l is not supported in a rules file"]


def test_config_applies_rule_timeouts_over_the_profile() -> None:
    cfg = loads(
        '[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
        '[masquerade]\nprofile = "linux-2.2"\n[firewall]\nrules = "ipfwadm -M -s 0 60 200"\n'
    )
    t = cfg.masquerade.effective_timeouts
    assert (t.tcp_established, t.tcp_fin, t.udp, t.icmp) == (900.0, 60, 200, 60.0)


# ------------------------------------------------------------------ ICMP names

# every name and alias ipchains -h icmp lists, as it prints them
IPCHAINS_ICMP = """echo-reply pong destination-unreachable network-unreachable host-unreachable
protocol-unreachable port-unreachable fragmentation-needed source-route-failed network-unknown
host-unknown network-prohibited host-prohibited TOS-network-unreachable TOS-host-unreachable
communication-prohibited host-precedence-violation precedence-cutoff source-quench redirect
network-redirect host-redirect TOS-network-redirect TOS-host-redirect echo-request ping
router-advertisement router-solicitation time-exceeded ttl-exceeded ttl-zero-during-transit
ttl-zero-during-reassembly parameter-problem ip-header-bad required-option-missing
timestamp-request timestamp-reply address-mask-request address-mask-reply""".split()


def test_every_icmp_name_ipchains_lists_is_accepted() -> None:
    assert len(IPCHAINS_ICMP) == len(ICMP_TYPES) == 39
    text = "".join(f"ipchains -A input -p icmp --icmp-type {name} -j ACCEPT\n" for name in IPCHAINS_ICMP)
    rules = build(text).chains["input"].rules
    assert [r.sports[0][0] for r in rules] == [ICMP_TYPES[n.lower()][0] for n in IPCHAINS_ICMP]
    by = dict(zip(IPCHAINS_ICMP, rules, strict=True))
    assert by["ttl-exceeded"].sports == ((11, 11),) and by["ttl-exceeded"].dports == ()
    assert by["TOS-host-redirect"].dports == ((3, 3),)


def test_icmp_names_may_be_abbreviated_while_unique() -> None:
    rules = build(
        "ipchains -A input -p icmp --icmp-type echo-req -j ACCEPT\n"
        "ipchains -A input -p icmp -s 0/0 ttl-e -j ACCEPT\n"
        "ipchains -A input -p icmp --icmp-type FRAG -j ACCEPT\n"
        "ipchains -A input -p icmp --icmp-type Source-Q -j ACCEPT\n"
    ).chains["input"].rules
    assert [(r.sports, r.dports) for r in rules] == [
        (((8, 8),), ()), (((11, 11),), ()), (((3, 3),), ((4, 4),)), (((4, 4),), ())
    ]
    assert errors_of("ipchains -A input -p icmp --icmp-type echo -j ACCEPT") == [
        "s.rules:1: ambiguous ICMP type 'echo': echo-reply, echo-request?"
    ]
    assert errors_of("ipchains -A input -p icmp --icmp-type ttl-zero -j ACCEPT") == [
        "s.rules:1: ambiguous ICMP type 'ttl-zero': ttl-zero-during-transit, ttl-zero-during-reassembly?"
    ]


# ------------------------------------------------------------------ forwards on other addresses


def test_port_forwards_on_masqd_wan_address_work_and_others_are_refused() -> None:
    rs = build(
        "ipmasqadm portfw -a -P tcp -L 203.0.113.200 8080 -R 10.0.0.5 80\n"
        "ipportfw -A -u 203.0.113.200/isakmp -R 10.0.0.6/500\n"
    )
    assert [(f.proto, f.listen, f.port) for f in rs.portfw] == [("tcp", "203.0.113.200", 8080), ("udp", "203.0.113.200", 500)]
    assert errors_of("ipmasqadm portfw -a -P tcp -L 198.51.100.9 25 -R 10.0.0.5 25") == [
        "s.rules:1: port forward on 198.51.100.9, which is not masqd's WAN address (203.0.113.200): it would "
        'never receive a packet; write $WAN (or wan), or map the address in firewall.aliases, e.g. "198.51.100.9" = "wan"'
    ]
    assert errors_of("ipportfw -A -t 10.0.0.1/25 -R 10.0.0.5/25") == [
        "s.rules:1: port forward on 10.0.0.1, masqd's LAN side: masqd forwards ports that arrive on its WAN "
        "address (write $WAN or wan)"
    ]
    aliased = env(aliases={"198.51.100.9": "wan"})
    assert [f.listen for f in build("ipportfw -A -t 198.51.100.9/25 -R 10.0.0.5/25", aliased).portfw] == ["wan"]


def test_config_forward_on_another_address_is_refused() -> None:
    base = '[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
    with pytest.raises(ConfigError) as exc:
        loads(base + '[forwarding]\nportfw = [{proto = "tcp", listen = "198.51.100.9", port = 80, to = "10.0.0.5", to_port = 80}]\n')
    assert exc.value.errors[0].startswith("forwarding.portfw[0]: port forward on 198.51.100.9, which is not masqd's WAN")
    cfg = loads(base + '[forwarding]\nportfw = [{proto = "tcp", listen = "203.0.113.200", port = 80, to = "10.0.0.5", to_port = 80}]\n')
    assert [f.listen for f in build_ruleset(cfg).portfw] == ["203.0.113.200"]
    with pytest.raises(ConfigError) as exc:
        loads(base + '[forwarding]\nportfw = [{proto = "tcp", port = 0, to = "10.0.0.5", to_port = 80}]\n')
    assert exc.value.errors == ["forwarding.portfw.0: Value error, port must be 1..65535, not 0"]


# ------------------------------------------------------------------ still errors


@pytest.mark.parametrize(("line", "error"), [
    ("ipchains -A input -p tcp -d 0/0 telnet -j accept", "unknown target 'accept' (targets are upper case: ACCEPT)"),
    ("ipchains -A forward -s 10.0.0.0/8 -j deny", "unknown target 'deny' (targets are upper case: DENY)"),
    ("ipchains -A input -p tcp -s 10.0.0.0 /8 -j DENY", "'/8' after an address: a stray space? write ADDR/MASK as one word"),
    ("ipfwadm -I -a deny -P udp -S 10.1.2.0 /24", "'/24' after an address: a stray space? write ADDR/MASK as one word"),
    ("ipchains -A input -s 10.0.0. 3 -j DENY", "bad address '10.0.0.'"),
])
def test_lines_the_real_tools_refused_stay_errors(line: str, error: str) -> None:
    assert errors_of(line) == [f"s.rules:1: {error}"]


# ------------------------------------------------------------------ one script through rules check


SCRIPT = """\
#!/bin/sh
# a dial-up gateway, written the way scripts of the time were
ipchains -F
ipchains -P input DENY
ipchains -A input -i lo -j ACCEPT
ipchains -A input -i ppp+ -p tcp -d 0/0 auth -j REJECT
ipchains -A input -i ppp+ -p icmp --icmp-type dest -j ACCEPT
ipchains -A input -i eth0 -s 10.0.0.0/8 -j ACCEPT
ipfwadm -I -a accept -P tcp -k -W ppp0 -D 0/0 1024:65535
ipchains -A forward -s 10.0.0.0/8 -p tcp -d 0/0 ssh -t 0x01 0x10 -j MASQ
ipchains -A forward -s 10.0.0.0/8 -j MASQ
ipchains -M -S 7200 10 160
ipmasqadm portfw -a -P tcp -L $WAN www -R 10.0.0.80 www
"""


def test_a_whole_script_passes_rules_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = check(tmp_path, SCRIPT, capsys)
    assert rc == 0
    assert [ln.split(": warning: ")[0] for ln in err.splitlines()] == ["s.rules:5"]
    assert out.splitlines() == [
        "Chain input (policy DENY):",
        "target     prot  opt    ifname     source                destination           ports",
        "ACCEPT     all   --     lo         0.0.0.0/0             0.0.0.0/0             n/a",
        "REJECT     tcp   --     wan        0.0.0.0/0             0.0.0.0/0             * ->   113",
        "ACCEPT     icmp  --     wan        0.0.0.0/0             0.0.0.0/0             3 ->   *",
        "ACCEPT     all   --     lan        10.0.0.0/8            0.0.0.0/0             n/a",
        "ACCEPT     tcp   k      wan        0.0.0.0/0             0.0.0.0/0             * ->   1024:65535",
        "",
        "Chain forward (policy MASQ):",
        "target     prot  opt    ifname     source                destination           ports",
        "MASQ       tcp   --     *          10.0.0.0/8            0.0.0.0/0             * ->   22  TOS 0x01/0x10",
        "MASQ       all   --     *          10.0.0.0/8            0.0.0.0/0             n/a",
        "",
        "Chain output (policy ACCEPT):",
        "target     prot  opt    ifname     source                destination           ports",
        "",
        "Port forwards:",
        "prot  localaddr         lport  rediraddr         rport  pref",
        "TCP   wan                  80  10.0.0.80            80    10",
        "",
        "Masquerade timeouts (-M -S): tcp 7200 s, tcpfin 10 s, udp 160 s",
    ]
