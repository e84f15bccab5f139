"""Firewall data model: verdicts, flags, rules, chains, forwards and the Decision type.

A ``Rule`` is the parsed, validated meaning of one ipchains/ipfwadm rule: plain
ints and small tuples that the compiler turns into Python source. Rules and
chains carry packet and byte counters the engine bumps (``r.pkts += 1;
r.bytes += n``, or ``Decision.account(n)``). ``PortForward`` and
``ProtoForward`` are the inbound forwards (ipportfw / ipmasqadm portfw, ipfwd);
the configuration's ``[forwarding]`` section is made of the same types.
Nothing here knows any syntax.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, NamedTuple

ACCEPT, DENY, REJECT, MASQ = 0, 1, 2, 3
VERDICT_NAMES = {ACCEPT: "ACCEPT", DENY: "DENY", REJECT: "REJECT", MASQ: "MASQ"}
VERDICT_BY_NAME = {v: k for k, v in VERDICT_NAMES.items()}

FLAG_SYN = 1  # TCP SYN set and ACK clear (ipchains -y)
FLAG_FRAG = 2  # a non-first fragment (ipchains -f)
FLAG_ACK = 4  # TCP ACK set (ipfwadm -k)

# REJECT answers with ICMP destination unreachable, code "port unreachable",
# for every protocol: that is what Linux 2.2's ipchains REJECT sent. (The
# engine never answers an ICMP error with another one, RFC 1122 3.2.2.)
ICMP_UNREACH = 3
ICMP_PORT_UNREACH = 3

BUILTIN_CHAINS = ("input", "forward", "output")
IFACES = ("lan", "wan")
# The loopback interface of the scripts' hosts. masqd has no loopback side: a rule on
# it is kept, listed and counted, and never matches (``! lo`` matches every packet).
LOOPBACK = "lo"

# Targets that end the walk; RETURN, jumps and "no target" do not.
TERMINAL = {"ACCEPT": ACCEPT, "DENY": DENY, "REJECT": REJECT, "MASQ": MASQ}

PROTO_NAMES = {1: "icmp", 2: "igmp", 4: "ipip", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah", 89: "ospf"}
PROTO_BY_NAME = {v: k for k, v in PROTO_NAMES.items()} | {"all": 0}

Ports = tuple[tuple[int, int], ...]  # inclusive ranges; () means "any"


def policy_name(v: int | None) -> str:
    return VERDICT_NAMES.get(v, "-") if v is not None else "-"


def proto_name(p: int) -> str:
    return "all" if p == 0 else PROTO_NAMES.get(p, str(p))


def ip_str(a: int) -> str:
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def prefix_len(mask: int) -> int | None:
    """The prefix length of a contiguous netmask, else None."""
    n = bin(mask).count("1")
    return n if mask == ((0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF) else None


def addr_str(addr: int, mask: int, neg: bool = False, bare_host: bool = False) -> str:
    """``10.0.0.0/8``; a /32 prints as a bare address when ``bare_host`` (ipchains -L -n)."""
    n = prefix_len(mask)
    if bare_host and mask == 0xFFFFFFFF:
        s = ip_str(addr)
    else:
        s = f"{ip_str(addr)}/{n if n is not None else ip_str(mask)}"
    return ("!" if neg else "") + s


def ports_str(ports: Ports) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ports)


class Decision(NamedTuple):
    """What a chain walk decided.

    ``rules``: every rule (and built-in chain, for its policy) that matched,
    whose counters this packet bumps. ``logged``: the matching rules with -l.
    ``code``: the ICMP destination-unreachable code to send for REJECT.
    ``tos``: (AND mask, XOR mask) to apply to the packet's TOS byte when it
    passes (ipchains -t; the masks of every matching rule, composed in walk
    order), or None. ``cache``: False when the decision holds for this packet
    only and must not be reused for later packets of its flow: a TOS rewrite
    is per packet, and a walk that met -y/-k rules on a TCP packet whose flags
    are not those of an established flow (ACK set, no SYN) may differ for them.
    """

    verdict: int
    rules: tuple = ()
    logged: tuple = ()
    code: int = ICMP_PORT_UNREACH
    tos: tuple[int, int] | None = None
    cache: bool = True

    def account(self, nbytes: int) -> None:
        """Bump the counters of every rule that matched by one packet of ``nbytes``."""
        for r in self.rules:
            r.pkts += 1
            r.bytes += nbytes


class Rule:
    """One rule. Match fields are ints; ``ifaces`` None means any interface."""

    __slots__ = (
        "chain", "target", "proto", "proto_neg", "src", "smask", "src_neg", "sports", "sport_neg",
        "dst", "dmask", "dst_neg", "dports", "dport_neg", "ifaces", "iface_name", "iface_neg",
        "syn", "frag", "log", "origin", "pkts", "bytes", "ack", "tos_and", "tos_xor",
    )

    def __init__(
        self,
        chain: str,
        target: str = "",
        proto: int = 0,
        proto_neg: bool = False,
        src: int = 0,
        smask: int = 0,
        src_neg: bool = False,
        sports: Ports = (),
        sport_neg: bool = False,
        dst: int = 0,
        dmask: int = 0,
        dst_neg: bool = False,
        dports: Ports = (),
        dport_neg: bool = False,
        ifaces: frozenset[str] | None = None,
        iface_name: str = "",
        iface_neg: bool = False,
        syn: int = 0,
        frag: int = 0,
        log: bool = False,
        origin: str = "",
        ack: int = 0,
        tos_and: int = 0xFF,
        tos_xor: int = 0,
    ) -> None:
        self.chain = chain
        self.target = target  # ACCEPT DENY REJECT MASQ RETURN, a user chain, or "" (count only)
        self.proto = proto  # 0 = all
        self.proto_neg = proto_neg
        self.src, self.smask, self.src_neg = src & smask, smask, src_neg
        self.sports, self.sport_neg = sports, sport_neg
        self.dst, self.dmask, self.dst_neg = dst & dmask, dmask, dst_neg
        self.dports, self.dport_neg = dports, dport_neg
        self.ifaces, self.iface_name, self.iface_neg = ifaces, iface_name, iface_neg
        self.syn = syn  # 0 any, 1 SYN only (-y), -1 not SYN (! -y)
        self.frag = frag  # 0 any, 1 non-first fragments only (-f), -1 not those (! -f)
        self.log = log
        self.ack = ack  # 0 any, 1 TCP ACK set only (ipfwadm -k)
        self.tos_and, self.tos_xor = tos_and, tos_xor  # ipchains -t; 0xFF 0x00 leaves TOS alone
        self.origin = origin  # "SOURCE:LINE" it came from
        self.pkts = 0
        self.bytes = 0

    def key(self) -> tuple:
        """Everything that defines the rule (for ``-D`` by specification)."""
        return (
            self.target, self.proto, self.proto_neg, self.src, self.smask, self.src_neg, self.sports,
            self.sport_neg, self.dst, self.dmask, self.dst_neg, self.dports, self.dport_neg,
            self.ifaces, self.iface_neg, self.syn, self.frag, self.log, self.ack, self.tos_and,
            self.tos_xor,
        )

    @property
    def tos(self) -> tuple[int, int] | None:
        """(AND, XOR) masks when the rule rewrites TOS, else None."""
        return None if (self.tos_and, self.tos_xor) == (0xFF, 0) else (self.tos_and, self.tos_xor)

    def iface_str(self) -> str:
        if self.ifaces is None:
            return "*"
        s = "+".join(sorted(self.ifaces)) or "none"
        return ("!" if self.iface_neg else "") + s

    def opt_str(self) -> str:
        out = ""
        if self.syn:
            out += "y" if self.syn > 0 else "!y"
        if self.frag:
            out += "f" if self.frag > 0 else "!f"
        if self.ack:
            out += "k"
        if self.log:
            out += "l"
        return out or "--"

    def spec(self) -> str:
        """The rule as one normalised ipchains command line (without ``-A chain``)."""
        parts: list[str] = []
        if self.proto or self.proto_neg:
            parts += ["-p", ("! " if self.proto_neg else "") + proto_name(self.proto)]
        for flag, a, m, neg, ports, pneg in (
            ("-s", self.src, self.smask, self.src_neg, self.sports, self.sport_neg),
            ("-d", self.dst, self.dmask, self.dst_neg, self.dports, self.dport_neg),
        ):
            if m or neg or ports:
                parts += [flag, ("! " if neg else "") + addr_str(a, m)]
                if ports:
                    parts.append(("! " if pneg else "") + ports_str(ports))
        if self.ifaces is not None:
            parts += ["-i", ("! " if self.iface_neg else "") + ("+".join(sorted(self.ifaces)) or "none")]
        if self.syn:
            parts.append("-y" if self.syn > 0 else "! -y")
        if self.frag:
            parts.append("-f" if self.frag > 0 else "! -f")
        if self.ack:
            parts.append("-k")
        if self.tos is not None:
            parts += ["-t", f"0x{self.tos_and:02x}", f"0x{self.tos_xor:02x}"]
        if self.target:
            parts += ["-j", self.target]
        if self.log:
            parts.append("-l")
        return " ".join(parts)

    def __str__(self) -> str:
        return f"-A {self.chain} {self.spec()}".rstrip()

    def __repr__(self) -> str:
        return f"<Rule {self} ({self.origin})>"


class Chain:
    """A chain of rules. Built-in chains have a policy, whose counters live here."""

    __slots__ = ("name", "builtin", "policy", "rules", "pkts", "bytes", "policy_origin")

    def __init__(self, name: str, policy: int | None = None) -> None:
        self.name = name
        self.builtin = policy is not None
        self.policy = policy
        self.rules: list[Rule] = []
        self.pkts = 0  # packets that fell to the policy
        self.bytes = 0
        self.policy_origin = ""

    def __str__(self) -> str:
        if self.policy is None:
            return f"chain {self.name}"
        return f"-P {self.name} {VERDICT_NAMES[self.policy]}"

    def __repr__(self) -> str:
        return f"<Chain {self.name} {len(self.rules)} rules>"


@dataclass(frozen=True, kw_only=True)
class PortForward:
    """New inbound ``proto`` connections to ``listen``:``port`` go to ``to``:``to_port``.

    ``listen`` is "wan" (the WAN address, whatever it is) or a literal address.
    Servers sharing one port take new connections by ``pref`` weight.
    """

    __pydantic_config__ = {"extra": "forbid"}  # read by the config loader's validation

    proto: Literal["tcp", "udp"]
    listen: str = "wan"
    port: int
    to: ipaddress.IPv4Address
    to_port: int
    pref: int = 10

    def __post_init__(self) -> None:
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, not {self.proto!r}")
        for name, v in (("port", self.port), ("to_port", self.to_port)):
            if not 1 <= v <= 65535:
                raise ValueError(f"{name} must be 1..65535, not {v}")
        if self.pref < 1:
            raise ValueError(f"pref must be at least 1, not {self.pref}")


@dataclass(frozen=True, kw_only=True)
class ProtoForward:
    """Unsolicited inbound packets of IP protocol ``proto`` go to LAN host ``to``."""

    __pydantic_config__ = {"extra": "forbid"}

    proto: int
    to: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        if not 0 <= self.proto <= 255:
            raise ValueError(f"proto must be 0..255, not {self.proto}")
