"""Chain evaluation semantics: policies, first match, jumps and RETURN, matches, counters.

The compiled evaluator is also checked against a plain reference walk written
here from the ipchains rules (hypothesis generates rule sets and packets).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from masqd.firewall import (
    ACCEPT,
    DENY,
    FLAG_ACK,
    FLAG_FRAG,
    FLAG_SYN,
    ICMP_PORT_UNREACH,
    MASQ,
    REJECT,
    Decision,
    compile_text,
)
from masqd.firewall.model import TERMINAL, Chain, Rule
from masqd.firewall.parse import Env
from masqd.firewall.ruleset import Ruleset

TCP, UDP, ICMP, GRE, ESP = 6, 17, 1, 47, 50


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def build(text: str, **policies: int) -> Ruleset:
    env = Env(lan_ip=ip("10.0.0.1"), wan_ip=ip("203.0.113.200"))
    if policies:
        env.policies = {**env.policies, **policies}
    rs, errors = compile_text(text, "t.rules", env)
    assert errors == [], errors
    assert rs is not None
    return rs


def v(rs: Ruleset, chain: str, iface: str = "wan", proto: int = TCP, src: str = "10.0.0.2",
      dst: str = "198.51.100.1", sport: int = 1025, dport: int = 80, flags: int = 0) -> int:
    return rs.evaluate(chain, iface, proto, ip(src), ip(dst), sport, dport, flags).verdict


def test_policies_and_trivial() -> None:
    rs = build("")
    assert rs.trivial
    assert rs.policy == {"input": ACCEPT, "forward": MASQ, "output": ACCEPT}
    d = rs.evaluate("forward", "wan", TCP, 1, 2, 3, 4, 0)
    assert d.verdict == MASQ and d.rules == (rs.chains["forward"],) and d.logged == ()
    rs = build("ipchains -P input DENY\nipchains -P forward REJECT\nipchains -P output DENY")
    assert rs.trivial
    assert (v(rs, "input"), v(rs, "forward"), v(rs, "output")) == (DENY, REJECT, DENY)
    assert not build("ipchains -A input -j ACCEPT").trivial


def test_generation_increases_with_each_build() -> None:
    a, b = build(""), build("")
    assert b.generation > a.generation


def test_first_match_wins() -> None:
    rs = build(
        "ipchains -A forward -p tcp -d 198.51.100.1 80 -j DENY\n"
        "ipchains -A forward -p tcp -j ACCEPT\n"
        "ipchains -A forward -j REJECT\n"
    )
    assert v(rs, "forward") == DENY
    assert v(rs, "forward", dport=81) == ACCEPT
    assert v(rs, "forward", proto=UDP) == REJECT


def test_insert_delete_replace_flush() -> None:
    rs = build(
        "ipchains -A input -p tcp -j ACCEPT\n"
        "ipchains -I input -p tcp -j DENY\n"  # now first
        "ipchains -I input 2 -p udp -j REJECT\n"
        "ipchains -D input -p tcp -j ACCEPT\n"
        "ipchains -A input -p icmp -j DENY\n"
        "ipchains -R input 3 -p icmp -j REJECT\n"
    )
    assert [r.target for r in rs.chains["input"].rules] == ["DENY", "REJECT", "REJECT"]
    assert v(rs, "input") == DENY
    rs = build("ipchains -A input -p tcp -j DENY\nipchains -A output -j DENY\nipchains -D input 1\nipchains -F output")
    assert rs.trivial
    rs = build("ipchains -A input -j DENY\nipchains -A forward -j DENY\nipchains -F")
    assert rs.trivial


def test_user_chains_jump_and_return() -> None:
    rs = build(
        "ipchains -N vpn\n"
        "ipchains -A vpn -p udp -s 0/0 500 -d 0/0 500 -j ACCEPT\n"
        "ipchains -A vpn -p 50 -j ACCEPT\n"
        "ipchains -A vpn -p tcp -j RETURN\n"
        "ipchains -A vpn -j DENY\n"
        "ipchains -A input -s 198.51.100.1 -j vpn\n"
        "ipchains -A input -p tcp -j REJECT\n",
        input=ACCEPT,
    )
    assert not rs.trivial
    vpn = rs.chains["vpn"].rules
    top = rs.chains["input"].rules
    d = rs.evaluate("input", "wan", UDP, ip("198.51.100.1"), ip("203.0.113.200"), 500, 500, 0)
    assert d.verdict == ACCEPT and d.rules == (top[0], vpn[0])
    d = rs.evaluate("input", "wan", TCP, ip("198.51.100.1"), ip("203.0.113.200"), 1723, 1025, 0)
    assert d.verdict == REJECT and d.rules == (top[0], vpn[2], top[1])  # RETURN continues after the jump
    d = rs.evaluate("input", "wan", GRE, ip("198.51.100.1"), ip("203.0.113.200"), 0, 0, 0)
    assert d.verdict == DENY and d.rules == (top[0], vpn[3])
    d = rs.evaluate("input", "wan", GRE, ip("198.51.100.2"), ip("203.0.113.200"), 0, 0, 0)
    assert d.verdict == ACCEPT and d.rules == (rs.chains["input"],)  # policy, counted on the chain


def test_falling_off_a_user_chain_returns() -> None:
    rs = build("ipchains -N a\nipchains -N b\nipchains -A a -j b\nipchains -A b -p udp -j DENY\n"
               "ipchains -A forward -j a\nipchains -A forward -p tcp -j REJECT", forward=ACCEPT)
    assert v(rs, "forward", proto=UDP) == DENY
    assert v(rs, "forward", proto=TCP) == REJECT
    assert v(rs, "forward", proto=ICMP) == ACCEPT


def test_return_in_builtin_chain_applies_policy() -> None:
    rs = build("ipchains -A output -p tcp -j RETURN\nipchains -A output -j ACCEPT", output=DENY)
    d = rs.evaluate("output", "wan", TCP, 1, 2, 3, 4, 0)
    assert d.verdict == DENY and d.rules == (rs.chains["output"].rules[0], rs.chains["output"])
    assert v(rs, "output", proto=UDP) == ACCEPT


def test_count_only_rules_continue() -> None:
    rs = build("ipchains -A input -p tcp\nipchains -A input -p tcp -j DENY", input=ACCEPT)
    d = rs.evaluate("input", "lan", TCP, 1, 2, 3, 4, 0)
    assert d.verdict == DENY and len(d.rules) == 2
    d.account(100)
    d.account(50)
    r0, r1 = rs.chains["input"].rules
    assert (r0.pkts, r0.bytes, r1.pkts, r1.bytes) == (2, 150, 2, 150)


def test_negations() -> None:
    rs = build(
        "ipchains -A forward -p ! tcp -j DENY\n"
        "ipchains -A forward -p tcp -s ! 10.0.0.0/8 -j REJECT\n"
        "ipchains -A forward -p tcp -d 0/0 ! 80 -j ACCEPT\n"
        "ipchains -A forward -p tcp -i ! wan -j REJECT\n"
        "ipchains -A forward -p tcp -j MASQ\n",
        forward=DENY,
    )
    assert v(rs, "forward", proto=UDP) == DENY
    assert v(rs, "forward", src="11.0.0.1") == REJECT
    assert v(rs, "forward", dport=81) == ACCEPT
    assert v(rs, "forward", dport=80, iface="lan") == REJECT
    assert v(rs, "forward", dport=80, iface="wan") == MASQ
    rs = build("ipchains -A input ! -y -p tcp -j ACCEPT\nipchains -A input ! -f -j REJECT", input=DENY)
    assert v(rs, "input", flags=0) == ACCEPT
    assert v(rs, "input", flags=FLAG_SYN) == REJECT
    assert v(rs, "input", proto=UDP, flags=FLAG_FRAG) == DENY


def test_addresses_masks_and_dotted_netmasks() -> None:
    rs = build(
        "ipchains -A input -s 10.1.0.0/255.255.0.0 -j DENY\n"
        "ipchains -A input -s 10.2.3.4/16 -j REJECT\n"  # host bits are masked, as ipchains did
        "ipchains -A input -d 203.0.113.200 -j ACCEPT\n",
        input=ACCEPT,
    )
    assert v(rs, "input", src="10.1.200.9") == DENY
    assert v(rs, "input", src="10.2.0.1") == REJECT
    assert str(rs.chains["input"].rules[1]) == "-A input -s 10.2.0.0/16 -j REJECT"
    rs = build("ipchains -A input -s 10.0.0.0/255.0.255.0 -j DENY")  # non-contiguous masks work too
    assert v(rs, "input", src="10.9.0.9") == DENY
    assert v(rs, "input", src="10.9.1.9") == ACCEPT


def test_port_ranges_and_lists() -> None:
    rs = build(
        "ipchains -A input -p udp -s 0/0 1024:65535 -d 0/0 :1023 -j DENY\n"
        "ipchains -A input -p udp --sport 53 --dport 1024: -j REJECT\n"
        "ipfwadm -I -a accept -P tcp -S 0/0 22 80 443 -D 0/0 1024:65535\n",
        input=DENY,
    )
    assert v(rs, "input", proto=UDP, sport=1024, dport=1023) == DENY
    assert v(rs, "input", proto=UDP, sport=1023, dport=1023) == DENY  # policy: no rule matched
    assert v(rs, "input", proto=UDP, sport=53, dport=40000) == REJECT
    rs2 = build("ipfwadm -I -a reject -P tcp -S 0/0 22 80 443 -D 0/0 1024:65535", input=ACCEPT)
    for sport in (22, 80, 443):
        assert v(rs2, "input", sport=sport, dport=5000) == REJECT
    assert v(rs2, "input", sport=23, dport=5000) == ACCEPT
    assert v(rs2, "input", sport=80, dport=1023) == ACCEPT


def test_icmp_types_and_codes() -> None:
    rs = build(
        "ipchains -A input -p icmp --icmp-type echo-request -j DENY\n"
        "ipchains -A input -p icmp -s 0/0 port-unreachable -j REJECT\n"
        "ipchains -A input -p icmp -s 0/0 11 -d 0/0 1 -j DENY\n"
        "ipchains -A input -p icmp --icmp-type ! destination-unreachable -j ACCEPT\n",
        input=DENY,
    )
    assert v(rs, "input", proto=ICMP, sport=8, dport=0) == DENY
    assert v(rs, "input", proto=ICMP, sport=3, dport=3) == REJECT
    assert v(rs, "input", proto=ICMP, sport=11, dport=1) == DENY
    assert v(rs, "input", proto=ICMP, sport=0, dport=0) == ACCEPT  # not destination-unreachable
    assert v(rs, "input", proto=ICMP, sport=3, dport=1) == DENY  # policy


def test_syn_and_fragments() -> None:
    rs = build(
        "ipchains -A input -p tcp -y -i wan -j DENY\n"
        "ipchains -A input -p tcp -d 0/0 80 -j ACCEPT\n"
        "ipchains -A input -f -j REJECT\n",
        input=DENY,
    )
    assert v(rs, "input", flags=FLAG_SYN) == DENY
    assert v(rs, "input", flags=FLAG_SYN, iface="lan") == ACCEPT
    assert v(rs, "input", flags=0) == ACCEPT
    # a non-first fragment carries no ports: the port rule cannot match it
    assert v(rs, "input", flags=FLAG_FRAG) == REJECT
    assert v(rs, "input", proto=GRE, flags=0) == DENY


def test_interface_aliases() -> None:
    env = Env(aliases={"eth0": "lan", "eth1": "wan", "ppp0": "wan", "ippp0": "wan", "tun-lan": "lan"})
    rs, errors = compile_text(
        "ipchains -A input -i ppp+ -j DENY\nipchains -A input -i tun-lan -j REJECT\n"
        "ipchains -A output -i lan -j DENY\nipchains -A output -i wan -j REJECT\n", "a", env)
    assert errors == [] and rs is not None
    assert v(rs, "input", iface="wan") == DENY
    assert v(rs, "input", iface="lan") == REJECT
    assert v(rs, "output", iface="lan") == DENY
    assert v(rs, "output", iface="wan") == REJECT
    rs, errors = compile_text("ipchains -A input -i eth+ -j DENY", "a", env)  # eth0 and eth1: both sides
    assert errors == [] and rs is not None
    assert v(rs, "input", iface="lan") == DENY and v(rs, "input", iface="wan") == DENY


def test_ipfwadm_v_maps_interface_address() -> None:
    rs = build("ipfwadm -I -a deny -V 203.0.113.200\nipfwadm -O -a reject -V 10.0.0.1")
    assert v(rs, "input", iface="wan") == DENY and v(rs, "input", iface="lan") == ACCEPT
    assert v(rs, "output", iface="lan") == REJECT and v(rs, "output", iface="wan") == ACCEPT


def test_ipfwadm_policies_masquerade_and_bidirectional() -> None:
    rs = build(
        "ipfwadm -F -p deny\n"
        "ipfwadm -F -a m -S 10.0.0.0/8 -D 0/0 -W eth1\n"
        "ipfwadm -I -a acc -b -P udp -S 10.0.0.2 500 -D 198.51.100.1 500\n"
        "ipfwadm -O -i rej -o -P icmp\n"
    )
    assert rs.policy["forward"] == DENY
    assert v(rs, "forward") == MASQ
    assert v(rs, "forward", iface="lan") == DENY
    assert len(rs.chains["input"].rules) == 2  # -b: both directions
    assert v(rs, "input", proto=UDP, src="198.51.100.1", dst="10.0.0.2", sport=500, dport=500) == ACCEPT
    d = rs.evaluate("output", "wan", ICMP, 1, 2, 8, 0, 0)
    assert d.verdict == REJECT and d.logged == d.rules and d.code == ICMP_PORT_UNREACH


def test_log_flag_reports_matching_rules() -> None:
    rs = build("ipchains -N x\nipchains -A x -l\nipchains -A input -j x -l\nipchains -A input -p tcp -j DENY -l")
    d = rs.evaluate("input", "lan", TCP, 1, 2, 3, 4, 0)
    assert d.verdict == DENY and len(d.logged) == 3
    d = rs.evaluate("input", "lan", UDP, 1, 2, 3, 4, 0)
    assert d.verdict == ACCEPT and len(d.logged) == 2


def test_reject_code_is_port_unreachable() -> None:
    rs = build("ipchains -A input -p udp -j REJECT", forward=REJECT)
    assert rs.evaluate("input", "lan", UDP, 1, 2, 3, 4, 0).code == ICMP_PORT_UNREACH == 3
    assert rs.evaluate("forward", "lan", GRE, 1, 2, 0, 0, 0).code == ICMP_PORT_UNREACH


def test_rule_str_is_a_normalised_ipchains_line() -> None:
    rs = build("ipfwadm -F -a accept -m -P udp -S 10.0.0.2/32 500 -D 198.51.100.1/32 500 -W ppp0")
    assert str(rs.chains["forward"].rules[0]) == (
        "-A forward -p udp -s 10.0.0.2/32 500 -d 198.51.100.1/32 500 -i wan -j MASQ"
    )
    assert rs.chains["forward"].rules[0].origin == "t.rules:1"


def test_structured_and_text_rules_agree() -> None:
    text = build("ipchains -A forward -p tcp -s 10.0.0.0/8 -d ! 198.51.100.0/24 1024:2000 -i wan -y -j DENY -l")
    r = text.chains["forward"].rules[0]
    assert r.spec() == "-p tcp -s 10.0.0.0/8 -d ! 198.51.100.0/24 1024:2000 -i wan -y -j DENY -l"


# ------------------------------------------------------------------ compiled == reference walk


def _ref_match(r: Rule, iface: str, proto: int, src: int, dst: int, sport: int, dport: int, flags: int) -> bool:
    if r.ifaces is not None and ((iface in r.ifaces) == r.iface_neg):
        return False
    if (r.proto or r.proto_neg) and ((r.proto == 0 or proto == r.proto) == r.proto_neg):
        return False
    if ((src & r.smask) == r.src) == r.src_neg:
        return False
    if ((dst & r.dmask) == r.dst) == r.dst_neg:
        return False
    if (r.sports or r.dports or r.syn or r.ack) and flags & FLAG_FRAG:
        return False
    if r.sports and any(lo <= sport <= hi for lo, hi in r.sports) == r.sport_neg:
        return False
    if r.dports and any(lo <= dport <= hi for lo, hi in r.dports) == r.dport_neg:
        return False
    if r.syn and bool(flags & FLAG_SYN) != (r.syn > 0):
        return False
    if r.ack and not flags & FLAG_ACK:
        return False
    return not (r.frag and bool(flags & FLAG_FRAG) != (r.frag > 0))


def _ref_walk(chains: dict[str, Chain], name: str, pkt: tuple) -> Decision:
    hit: list = []
    logged: list = []
    masks: list[tuple[int, int]] = []  # TOS masks of the matching rules, applied one after the other

    def walk(ch: Chain) -> int | None:  # verdict, or None for "return to the caller"
        for r in ch.rules:
            if not _ref_match(r, *pkt):
                continue
            hit.append(r)
            if r.log:
                logged.append(r)
            if r.tos is not None:
                masks.append(r.tos)
            if r.target in TERMINAL:
                return TERMINAL[r.target]
            if r.target == "RETURN":
                return None
            if r.target:
                res = walk(chains[r.target])
                if res is not None:
                    return res
        return None

    res = walk(chains[name])
    if res is None:
        hit.append(chains[name])
        res = chains[name].policy
    assert res is not None
    tos = None
    if masks:  # the one (AND, XOR) pair that does what the masks do in turn, for every TOS byte
        table = []
        for t in range(256):
            for a, x in masks:
                t = (t & a) ^ x
            table.append(t)
        tos = (table[0] ^ table[255], table[0])  # AND: bits that follow the input; XOR: the rest
    return Decision(res, tuple(hit), tuple(logged), tos=tos, cache=tos is None)


_addr = st.sampled_from(["10.0.0.0/8", "10.0.0.2", "198.51.100.1", "198.51.100.0/24", "0/0", "203.0.113.200"])
_ports = st.sampled_from(["500", "1723", "1024:65535", ":1023", "53"])


@st.composite
def _rule_line(draw: st.DrawFn, chain: str, targets: list[str]) -> str:
    parts = ["ipchains", "-A", chain]
    proto = draw(st.sampled_from(["", "tcp", "udp", "icmp", "47", "50"]))
    if proto:
        parts += ["-p"] + (["!"] if draw(st.booleans()) and draw(st.booleans()) else []) + [proto]
    negp = parts[-2:-1] == ["!"]
    icmp_ports = False
    for flag, icmp_choices in (("-s", ["echo-request", "0", "3", "8"]), ("-d", ["0", "3"])):
        if draw(st.booleans()):
            parts += [flag] + (["!"] if draw(st.booleans()) else []) + [draw(_addr)]
            if proto in ("tcp", "udp") and not negp and draw(st.booleans()):
                parts += (["!"] if draw(st.booleans()) else []) + [draw(_ports)]
            elif proto == "icmp" and not negp and draw(st.booleans()):
                parts += (["!"] if draw(st.booleans()) else []) + [draw(st.sampled_from(icmp_choices))]
                icmp_ports = True
    if proto == "icmp" and not negp and not icmp_ports and draw(st.booleans()):
        parts += ["--icmp-type", draw(st.sampled_from(["port-unreachable", "! echo-reply", "! 3"]))]
    if draw(st.booleans()):
        parts += ["-i"] + (["!"] if draw(st.booleans()) else []) + [draw(st.sampled_from(["eth0", "ppp0", "lan"]))]
    if proto == "tcp" and not negp and draw(st.booleans()):
        parts = parts + (["!"] if draw(st.booleans()) else []) + ["-y"]
    if draw(st.integers(0, 3)) == 0:
        parts += ["-t", *draw(st.sampled_from([("0x01", "0x10"), ("0x01", "0x08"), ("0xff", "0x10"), ("0xe1", "0x00")]))]
    target = draw(st.sampled_from(targets))
    if target:
        parts += ["-j", target]
    if draw(st.integers(0, 4)) == 0:
        parts.append("-l")
    return " ".join(parts)


@st.composite
def _ruleset_text(draw: st.DrawFn) -> str:
    lines = ["ipchains -N u1", "ipchains -N u2"]
    lines += [draw(_rule_line("u2", ["ACCEPT", "DENY", "RETURN", ""])) for _ in range(draw(st.integers(0, 4)))]
    lines += [draw(_rule_line("u1", ["ACCEPT", "REJECT", "RETURN", "u2", ""])) for _ in range(draw(st.integers(0, 4)))]
    for chain in ("input", "forward", "output"):
        targets = ["ACCEPT", "DENY", "REJECT", "RETURN", "u2", ""]
        if chain == "forward":
            targets += ["MASQ", "u1"]
        lines += [draw(_rule_line(chain, targets)) for _ in range(draw(st.integers(0, 6)))]
    return "\n".join(lines)


_pkt = st.tuples(
    st.sampled_from(["lan", "wan"]),
    st.sampled_from([TCP, UDP, ICMP, GRE, ESP]),
    st.sampled_from([ip(a) for a in ("10.0.0.2", "10.0.0.3", "198.51.100.1", "198.51.100.7", "203.0.113.200")]),
    st.sampled_from([ip(a) for a in ("10.0.0.2", "198.51.100.1", "203.0.113.200", "8.8.8.8")]),
    st.sampled_from([0, 3, 8, 53, 500, 1023, 1024, 1723, 40000]),
    st.sampled_from([0, 3, 53, 500, 1023, 1024, 1723, 40000]),
    st.sampled_from([0, FLAG_SYN, FLAG_FRAG, FLAG_ACK]),
)


@settings(max_examples=300, deadline=None)
@given(_ruleset_text(), st.lists(_pkt, min_size=1, max_size=8))
def test_compiled_evaluation_equals_reference_walk(text: str, pkts: list) -> None:
    rs = build(text)
    for chain in ("input", "forward", "output"):
        for pkt in pkts:
            want = _ref_walk(rs.chains, chain, pkt)
            # -y rules: a TCP packet's decision is reused for its flow only if it has ACK and no SYN
            if rs.flag_rules and pkt[1] == TCP and pkt[6] != FLAG_ACK:
                want = want._replace(cache=False)
            assert rs.evaluate(chain, *pkt) == want, (chain, pkt, text)
            assert rs.evaluator(chain)(*pkt) == want
            assert rs._eval[chain](*pkt) == want._replace(cache=want.tos is None)  # generic function


def test_long_chains_skip_the_per_protocol_table(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import masqd.firewall.ruleset as rmod

    monkeypatch.setattr(rmod, "SPECIALISE_MAX", 3)
    rs = build("\n".join(f"ipchains -A input -p udp -s 10.0.0.{i} -j DENY" for i in range(5)))
    assert rs._tab["input"] is None
    assert v(rs, "input", proto=UDP, src="10.0.0.4") == DENY
    assert v(rs, "input", proto=UDP, src="10.0.0.5") == ACCEPT


def test_forwarder_lines() -> None:
    rs = build(
        "ipmasqadm portfw -a -P tcp -L $WAN 1723 -R 10.0.0.2 1723 -p 5\n"
        "ipmasqadm portfw -a -P tcp -L wan 1723 -R 10.0.0.3 1723\n"
        "ipmasqadm portfw -a -P udp -L 203.0.113.200 500 -R 10.0.0.2 500\n"
        "ipmasqadm portfw -d -P tcp -L wan 1723 -R 10.0.0.3 1723\n"
        "ipportfw -A -t ${WAN}/8080 -R 10.0.0.3/80\n"
        "ipportfw -D -t wan/8080 -R 10.0.0.3/80\n"
        "ipportfw -A -u $4/4500 -R 10.0.0.2/4500\n"
        "/usr/sbin/ipfwd --masq 10.0.0.3 esp\n"
        "/sbin/ipfwd --masq 10.0.0.2 50 &\n"
        "ipfwd --masq 10.0.0.2 gre\n"
    )
    assert [(f.proto, f.listen, f.port, str(f.to), f.to_port, f.pref) for f in rs.portfw] == [
        ("tcp", "wan", 1723, "10.0.0.2", 1723, 5),
        ("udp", "203.0.113.200", 500, "10.0.0.2", 500, 10),
        ("udp", "wan", 4500, "10.0.0.2", 4500, 10),
    ]
    # a later ipfwd for the same protocol replaces the earlier one
    assert [(p.proto, str(p.to)) for p in rs.protofw] == [(50, "10.0.0.2"), (47, "10.0.0.2")]
    assert build("ipmasqadm portfw -a -P tcp -L wan 1 -R 10.0.0.2 1\nipmasqadm portfw -f").portfw == ()
    assert rs.trivial  # forwarders are not chain rules
