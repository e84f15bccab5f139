"""Bad rule lines: each one is reported as ``SOURCE:LINE: reason``, never raises, changes nothing."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqd.config import ConfigError, loads
from masqd.firewall import build_ruleset, compile_text, validate_config_rules
from masqd.firewall.parse import Env, Program

ENV = Env(lan_ip=(10 << 24) | 1, wan_ip=(203 << 24) | (113 << 8) | 200)


def errors_of(text: str) -> list[str]:
    rs, errors = compile_text(text, "f.rules", ENV)
    assert (rs is None) == bool(errors)
    return errors


CASES = [
    ("ipchains -A input -z -j DENY", "f.rules:1: unknown option '-z'"),
    ("ipchains -A input -s 10.0.0.256 -j DENY", "f.rules:1: bad address '10.0.0.256': octet above 255"),
    ("ipchains -A input -s 10.0.0.0/33 -j DENY", "f.rules:1: bad prefix length /33 in '10.0.0.0/33'"),
    ("ipchains -A input -s 10.0.0.0/255.0.0.x -j DENY", "f.rules:1: bad netmask '255.0.0.x' in '10.0.0.0/255.0.0.x'"),
    ("ipchains -A input -s vpn.example.com -j DENY", "f.rules:1: host name 'vpn.example.com': write an IPv4 address"),
    ("ipchains -A input -j MASQ", "f.rules:1: MASQ is only allowed in the forward chain, not in input"),
    ("ipchains -P output MASQ", "f.rules:1: MASQ policy is only allowed for the forward chain, not output"),
    ("ipfwadm -I -a masquerade", "f.rules:1: masquerade is only allowed with -F (forward), not input"),
    ("ipfwadm -O -a accept -m", "f.rules:1: -m (masquerade) is only valid with -F (forward)"),
    ("ipfwadm -F -a deny -m", "f.rules:1: -m (masquerade) goes with accept, not deny"),
    ("ipchains -A input -j nosuch", "f.rules:1: jump to missing chain 'nosuch' (create it first with -N)"),
    ("ipchains -A input -j accept", "f.rules:1: unknown target 'accept' (targets are upper case: ACCEPT)"),
    ("ipchains -A INPUT -j ACCEPT", "f.rules:1: no chain 'INPUT' (built-in chains are lower case)"),
    ("ipchains -A input -j input", "f.rules:1: cannot jump to built-in chain 'input'"),
    (
        "ipfwadm -0 -a accept -W eth1 -V 200.200.200.200 -P all -D 199.0.0.2/32 -S 222.0.0.2/32",
        "f.rules:1: unknown option '-0' (a zero): did you mean -O (letter O, not zero)?",
    ),
    ("ipchains -A input -i eth7 -j DENY", "f.rules:1: unknown interface 'eth7' (known: eth0=lan, eth1=wan, ippp+=wan, ppp+=wan, slip+=wan; map it in firewall.aliases)"),
    ("ipchains -A input -s 0/0 80 -j DENY", "f.rules:1: ports or ICMP types need -p tcp, udp or icmp"),
    ("ipchains -A input -p ! tcp -d 0/0 80 -j DENY", "f.rules:1: ports or ICMP types need -p tcp, udp or icmp"),
    ("ipchains -A input -p udp -y -j DENY", "f.rules:1: -y (SYN) needs -p tcp"),
    ("ipchains -A input -p tcp -f -d 0/0 80 -j DENY",
     "f.rules:1: -f cannot be combined with ports, ICMP types or -y: non-first fragments have none"),
    ("ipchains -A input -p tcp -d 0/0 99999 -j DENY", "f.rules:1: port 99999 above 65535"),
    ("ipchains -A input -p tcp -d 0/0 2000:1000 -j DENY", "f.rules:1: empty port range '2000:1000'"),
    ("ipchains -A input -p icmp --icmp-type bogus -j DENY", "f.rules:1: unknown ICMP type 'bogus'"),
    ("ipchains -A input -p 300 -j DENY", "f.rules:1: unknown protocol '300'"),
    ("ipchains -A input -p", "f.rules:1: option -p needs a value"),
    ("ipchains -A input -j ACCEPT -A output", "f.rules:1: only one command per line (-A and -A)"),
    ("ipchains -s 10.0.0.1", "f.rules:1: no command (-A, -I, -D, -R, -F, -X, -N or -P)"),
    ("ipchains -P input accept", "f.rules:1: bad policy 'accept' (targets are upper case): ACCEPT, DENY, REJECT or MASQ"),
    ("ipchains -P input RETURN", "f.rules:1: bad policy 'RETURN': ACCEPT, DENY, REJECT or MASQ"),
    ("ipchains -A input -j REDIRECT", "f.rules:1: REDIRECT is not supported"),
    ("ipchains -L", "f.rules:1: ipchains -L is not supported in a rules file"),
    ("ipchains -D input 3", "f.rules:1: chain input has no rule 3"),
    ("ipchains -D input -p tcp -j DENY", "f.rules:1: no rule like '-p tcp -j DENY' in chain input to delete"),
    ("ipchains -I input 5 -j DENY", "f.rules:1: cannot insert at 5: chain input has 0 rules"),
    ("ipchains -N input", "f.rules:1: chain 'input' already exists"),
    ("ipchains -N ACCEPT", "f.rules:1: 'ACCEPT' is reserved and cannot name a chain"),
    ("ipchains -X input", "f.rules:1: cannot delete built-in chain 'input'"),
    ("ipchains -P input DENY -s 10.0.0.1", "f.rules:1: -P takes no rule options (got -s)"),
    ("iptables -A INPUT -j ACCEPT",
     "f.rules:1: unknown command 'iptables' (expected ipchains, ipfwadm, ipmasqadm, ipportfw or ipfwd)"),
    ("ipchains -A input -s '10.0.0.1 -j DENY", "f.rules:1: unterminated ' quote"),
    ("ipfwadm -I -a accept -P gre", "f.rules:1: ipfwadm -P accepts tcp, udp, icmp or all, not 'gre' (use ipchains -p)"),
    ("ipfwadm -a accept -P tcp", "f.rules:1: no category (-I input, -O output or -F forward)"),
    ("ipfwadm -I -P tcp", "f.rules:1: no command (-a, -i, -d, -f or -p)"),
    ("ipfwadm -I -a maybe", "f.rules:1: bad policy 'maybe': accept, deny, reject or masquerade"),
    ("ipfwadm -I -a accept -W eth0 -V 203.0.113.200", "f.rules:1: -W eth0 and -V 203.0.113.200 name different interfaces"),
    ("ipfwadm -I -a accept -V 192.168.1.1",
     "f.rules:1: -V 192.168.1.1 is not an address of masqd (LAN 10.0.0.1, WAN 203.0.113.200); "
     'map it in firewall.aliases, e.g. "192.168.1.1" = "wan"'),
    ("ipfwadm -A in -a", "f.rules:1: ipfwadm -A (accounting) is not supported"),
    ("ipportfw -A -t 203.0.113.200 -R 10.0.0.2/1723", "f.rules:1: expected ADDR/PORT, got '203.0.113.200'"),
    ("ipportfw -A -t 203.0.113.200/1723", "f.rules:1: ipportfw needs -R ADDR/PORT"),
    ("ipportfw -A -t 203.0.113.200/0 -R 10.0.0.2/1723", "f.rules:1: port 0 cannot be forwarded"),
    ("ipportfw -D -t wan/1723 -R 10.0.0.2/1723", "f.rules:1: no such port forward tcp wan:1723 to delete"),
    ("ipportfw -X", "f.rules:1: unknown ipportfw command '-X' (expected -C, -A or -D)"),
    ("ipmasqadm portfw -a -P tcp -L wan 1723", "f.rules:1: ipmasqadm portfw -a needs -R ADDR PORT"),
    ("ipmasqadm portfw -a -P gre -L wan 1723 -R 10.0.0.2 1723", "f.rules:1: portfw forwards tcp or udp, not 'gre'"),
    ("ipmasqadm autofw -A", "f.rules:1: ipmasqadm: only the portfw module is supported, got 'autofw'"),
    ("ipfwd --masq 10.0.0.2 6", "f.rules:1: ipfwd forwards a whole IP protocol such as 47 or 50, not 6 (use ipportfw for tcp/udp)"),
    ("ipfwd --masq 10.0.0.0/8 47", "f.rules:1: expected a host address, got '10.0.0.0/8'"),
    ("ipfwd 10.0.0.2 47", "f.rules:1: expected: ipfwd --masq HOST PROTO"),
]


@pytest.mark.parametrize(("line", "error"), CASES)
def test_error_cases(line: str, error: str) -> None:
    assert errors_of(line) == [error]


def test_loops_between_user_chains_are_refused_with_the_line() -> None:
    text = "ipchains -N a\nipchains -N b\nipchains -A a -j b\n# comment\nipchains -A b -p tcp -j a\n"
    assert errors_of(text) == ["f.rules:5: jump to 'a' makes a loop: b -> a -> b"]
    assert errors_of("ipchains -N a\nipchains -A a -j a") == ["f.rules:2: jump to 'a' makes a loop: a -> a"]
    text = "ipchains -N a\nipchains -N b\nipchains -N c\nipchains -A a -j b\nipchains -A b -j c\nipchains -A c -j a"
    assert errors_of(text) == ["f.rules:6: jump to 'a' makes a loop: c -> a -> b -> c"]
    # a loop introduced by -R is refused too, and the old rule stays
    text = "ipchains -N a\nipchains -N b\nipchains -A a -j b\nipchains -A b -j DENY\nipchains -R b 1 -j a"
    prog = Program(ENV)
    prog.feed_text(text, "f.rules")
    assert prog.errors == ["f.rules:5: jump to 'a' makes a loop: b -> a -> b"]
    assert [r.target for r in prog.chains["b"].rules] == ["DENY"]


def test_masq_reached_from_input_through_a_user_chain() -> None:
    text = "ipchains -N m\nipchains -A m -j MASQ\nipchains -A forward -j m\nipchains -A input -j m\n"
    assert errors_of(text) == [
        "f.rules:4: input jumps to chain 'm', which reaches MASQ (f.rules:2); MASQ is only allowed from the forward chain"
    ]


def test_chain_deletion_rules() -> None:
    assert errors_of("ipchains -N a\nipchains -A a -j DENY\nipchains -X a") == [
        "f.rules:3: chain 'a' is not empty (flush it with -F first)"
    ]
    assert errors_of("ipchains -N a\nipchains -A input -j a\nipchains -X a") == [
        "f.rules:3: chain 'a' is still used by input (f.rules:2)"
    ]
    assert errors_of("ipchains -N a\nipchains -A input -j a\nipchains -X") == [
        "f.rules:3: chain 'a' is still used by input (f.rules:2)"
    ]
    assert errors_of("ipchains -N a\nipchains -N b\nipchains -A a -j b\nipchains -F a\nipchains -X b\nipchains -X a") == []
    assert errors_of("ipchains -N a\nipchains -N b\nipchains -A a -j b\nipchains -X") == []


def test_every_bad_line_is_reported_and_good_lines_still_count() -> None:
    text = textwrap.dedent("""\
        # a rules file with three mistakes
        ipchains -P forward DENY
        ipchains -A forward -j MASQ -s 10.0.0.0/8 \\
            -d 0.0.0.0/0 -i eth9
        ipchains -A input -j ACCEPT -s 10.0.0.0/8 -i eth0

        ipfwadm -0 -a accept -P all
        ipchains -A output -j MASQ
        ipchains -A output -j ACCEPT -i eth0
    """)
    prog = Program(ENV)
    prog.feed_text(text, "x.rules")
    assert [e.split(": ", 1)[0] for e in prog.errors] == ["x.rules:3", "x.rules:7", "x.rules:8"]
    assert "unknown interface 'eth9'" in prog.errors[0]
    assert len(prog.chains["input"].rules) == 1 and len(prog.chains["output"].rules) == 1
    assert prog.chains["forward"].rules == []


def test_limits() -> None:
    assert errors_of("ipchains " + "-v " * 3000) == ["f.rules:1: line longer than 4096 characters"]
    many = "\n".join(f"ipchains -A input -z{i}" for i in range(1200))
    errs = errors_of(many)
    assert len(errs) == 1001 and errs[-1] == "f.rules:1001: too many errors, stopping"


# ------------------------------------------------------------------ config integration

BASE = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
"""


def test_config_with_bad_rules_is_refused_whole() -> None:
    toml = BASE + '[firewall]\nrules = """\nipchains -P input DENY\nipchains -A input -j MASQ\nipchains -A forward -i eth9 -j MASQ\n"""\n'
    with pytest.raises(ConfigError) as exc:
        loads(toml, "m.toml")
    assert exc.value.errors == [
        "firewall.rules:2: MASQ is only allowed in the forward chain, not in input",
        "firewall.rules:3: unknown interface 'eth9' (known: eth0=lan, eth1=wan, ippp+=wan, ppp+=wan, slip+=wan; map it in firewall.aliases)",
    ]
    assert "m.toml: firewall.rules:2: MASQ" in str(exc.value)


def test_config_aliases_extend_the_defaults_and_map_v_addresses() -> None:
    toml = BASE + (
        '[firewall]\naliases = { "ippp0" = "wan", "200.200.200.200" = "wan" }\n'
        'rules = """\nipchains -A input -i ippp0 -j DENY\nipfwadm -I -a deny -V 200.200.200.200\n'
        'ipchains -A input -i eth0 -j ACCEPT\n"""\n'
    )
    cfg = loads(toml, "m.toml")
    rs = build_ruleset(cfg)
    assert [r.iface_str() for r in rs.chains["input"].rules] == ["wan", "wan", "lan"]


def test_config_rules_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "fw.rules").write_text("ipchains -P forward DENY\nipchains -A forward -p 50 -i ppp0 -j MASQ\n")
    cfgfile = tmp_path / "masqd.toml"
    cfgfile.write_text(BASE + '[firewall]\nrules_file = "fw.rules"\nrules = "ipchains -A forward -p 47 -j MASQ"\n')
    from masqd.config import load

    cfg = load(cfgfile)
    rs = build_ruleset(cfg)
    assert rs.policy["forward"] == 1
    assert [r.proto for r in rs.chains["forward"].rules] == [50, 47]  # file first, then inline
    (tmp_path / "bad.rules").write_text("ipchains -A forward -p 50 -i ppp0 -j MASQ\nipchains -A input -j MASQ\n")
    cfgfile.write_text(BASE + '[firewall]\nrules_file = "bad.rules"\n')
    with pytest.raises(ConfigError) as exc:
        load(cfgfile)
    assert exc.value.errors == ["bad.rules:2: MASQ is only allowed in the forward chain, not in input"]
    cfgfile.write_text(BASE + '[firewall]\nrules_file = "missing.rules"\n')
    with pytest.raises(ConfigError) as exc:
        load(cfgfile)
    assert exc.value.errors[0].startswith("firewall.rules_file: cannot read " + os.path.join(str(tmp_path), "missing.rules"))


def test_structured_rules() -> None:
    toml = BASE + """
[firewall]
forward_policy = "DENY"
[[firewall.rule]]
chain = "vpn"
target = "MASQ"
proto = "udp"
sport = "500"
dport = "500"
[[firewall.rule]]
chain = "vpn"
target = "MASQ"
proto = "!tcp"
[[firewall.rule]]
chain = "forward"
target = "vpn"
src = "10.0.0.2/32"
iface = "wan"
[[firewall.rule]]
chain = "forward"
target = "REJECT"
proto = "tcp"
syn = true
log = true
position = 1
"""
    cfg = loads(toml, "s.toml")
    rs = build_ruleset(cfg)
    ev = rs.evaluate
    assert [str(r) for r in rs.chains["forward"].rules] == [
        "-A forward -p tcp -y -j REJECT -l",
        "-A forward -s 10.0.0.2/32 -i wan -j vpn",
    ]
    assert ev("forward", "wan", 17, (10 << 24) | 2, 1, 500, 500, 0).verdict == 3
    assert ev("forward", "wan", 50, (10 << 24) | 2, 1, 0, 0, 0).verdict == 3
    assert ev("forward", "wan", 6, (10 << 24) | 2, 1, 1, 2, 0).verdict == 1
    assert ev("forward", "wan", 6, (10 << 24) | 2, 1, 1, 2, 1).verdict == 2
    bad = BASE + '[[firewall.rule]]\nchain = "input"\ntarget = "MASQ"\n[[firewall.rule]]\nchain = "input"\nsrc = "1.2.3"\n'
    with pytest.raises(ConfigError) as exc:
        loads(bad, "s.toml")
    assert exc.value.errors == [
        "firewall.rule[0]: MASQ is only allowed in the forward chain, not in input",
        "firewall.rule[1]: bad address '1.2.3'",
    ]


def test_validate_is_empty_for_a_good_config() -> None:
    cfg = loads(BASE, "ok.toml")
    assert validate_config_rules(cfg) == []


# ------------------------------------------------------------------ garbage never raises

_VOCAB = [
    "ipchains", "ipfwadm", "ipportfw", "ipmasqadm", "portfw", "ipfwd", "/sbin/ipchains", "-A", "-I", "-D",
    "-R", "-F", "-X", "-N", "-P", "-p", "-s", "-d", "-j", "-i", "-y", "-f", "-l", "-b", "!", "-a", "-m",
    "-W", "-V", "-S", "-O", "-0", "-C", "-t", "-u", "-L", "--masq", "--sport", "--dport", "--icmp-type",
    "input", "forward", "output", "x", "ACCEPT", "DENY", "MASQ", "RETURN", "REJECT", "accept", "m",
    "tcp", "udp", "icmp", "all", "47", "50", "0/0", "10.0.0.2/32", "10.0.0.0/255.0.0.0", "203.0.113.200",
    "500", "1024:65535", ":", "1723", "echo-request", "port-unreachable", "eth0", "ppp0", "ppp+", "wan",
    "${4}/500", "10.0.0.2/500", "&", "#", "\\", "'", '"', "999999999999999999999", "", "-", "--",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_VOCAB), max_size=14).map(" ".join), max_size=12))
def test_token_soup_never_raises(lines: list[str]) -> None:
    _check_garbage("\n".join(lines))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_random_text_never_raises(text: str) -> None:
    _check_garbage(text)


def _check_garbage(text: str) -> None:
    prog = Program(ENV)
    prog.feed_text(text, "g")
    prog.finish()
    for e in prog.errors:
        head, _, reason = e.partition(": ")
        assert head.startswith("g:") and head[2:].isdigit() and reason
    rs, errors = compile_text(text, "g", ENV)
    assert errors == prog.errors
    if rs is not None:
        for chain in ("input", "forward", "output"):
            for iface in ("lan", "wan"):
                d = rs.evaluate(chain, iface, 6, 1, 2, 3, 4, 1)
                assert d.verdict in (0, 1, 2, 3)
