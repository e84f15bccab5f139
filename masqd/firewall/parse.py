"""The HOWTO's rule language: ipchains, ipfwadm, ipportfw, ipmasqadm portfw, ipfwd.

Lines are executed in order on a ``Program`` (chains with policies and rules,
plus port and protocol forwards), the way the shell script in the HOWTO ran
the real tools one after the other. Each bad line becomes one message
``SOURCE:LINE: reason`` in ``Program.errors`` and changes nothing; parsing
never raises. Interface names map to ``lan``/``wan`` through an alias table;
``ipfwadm -V ADDR`` maps by comparing with masqd's own LAN and WAN addresses.

Deliberate choices: ports are allowed only with tcp, udp or icmp (as in both
tools); a non-first fragment never matches a rule with ports, ICMP type or
-y; user chains may hold MASQ only if no input/output rule reaches them; the
forwarders' WAN side may be a symbol (``wan``, ``$WAN``, ``${4}``) that follows
the WAN address.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from masqd.config import PortForward, ProtoForward
from masqd.firewall.model import (
    BUILTIN_CHAINS,
    IFACES,
    MASQ,
    PROTO_BY_NAME,
    TERMINAL,
    VERDICT_BY_NAME,
    VERDICT_NAMES,
    Chain,
    Ports,
    Rule,
    ip_str,
)

MAX_ERRORS = 1000  # a binary file fed as rules must not produce a million lines
MAX_LINE = 4096
MAX_RULES = 100_000

ICMP, TCP, UDP = 1, 6, 17

# ICMP names as ipchains knew them: name -> (type, code or None).
ICMP_TYPES: dict[str, tuple[int, int | None]] = {
    "echo-reply": (0, None), "pong": (0, None),
    "destination-unreachable": (3, None),
    "network-unreachable": (3, 0), "host-unreachable": (3, 1), "protocol-unreachable": (3, 2),
    "port-unreachable": (3, 3), "fragmentation-needed": (3, 4), "source-route-failed": (3, 5),
    "network-unknown": (3, 6), "host-unknown": (3, 7), "network-prohibited": (3, 9),
    "host-prohibited": (3, 10), "tos-network-unreachable": (3, 11), "tos-host-unreachable": (3, 12),
    "communication-prohibited": (3, 13), "host-precedence-violation": (3, 14),
    "precedence-cutoff": (3, 15),
    "source-quench": (4, None),
    "redirect": (5, None), "network-redirect": (5, 0), "host-redirect": (5, 1),
    "tos-network-redirect": (5, 2), "tos-host-redirect": (5, 3),
    "echo-request": (8, None), "ping": (8, None),
    "router-advertisement": (9, None), "router-solicitation": (10, None),
    "time-exceeded": (11, None), "ttl-zero-during-transit": (11, 0), "ttl-zero-during-reassembly": (11, 1),
    "parameter-problem": (12, None), "ip-header-bad": (12, 0), "required-option-missing": (12, 1),
    "timestamp-request": (13, None), "timestamp-reply": (14, None),
    "address-mask-request": (17, None), "address-mask-reply": (18, None),
}

SERVICES = {
    "ftp-data": 20, "ftp": 21, "ssh": 22, "telnet": 23, "smtp": 25, "domain": 53, "bootps": 67,
    "bootpc": 68, "www": 80, "http": 80, "pop3": 110, "sunrpc": 111, "auth": 113, "ntp": 123,
    "imap": 143, "imap2": 143, "snmp": 161, "https": 443, "isakmp": 500, "pptp": 1723,
    "ipsec-nat-t": 4500,
}

WAN_SYMBOLS = {"wan", "WAN", "$WAN", "${WAN}", "$4", "${4}"}
LAN_SYMBOLS = {"lan", "LAN", "$LAN", "${LAN}"}

_CHAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}\Z")
_ADDR = re.compile(r"\d{1,3}(\.\d{1,3}){3}\Z")


class Bad(Exception):
    """One refused line; the message is the reason."""


@dataclass
class Env:
    """What the rule language needs to know about the router."""

    aliases: dict[str, str] = field(default_factory=lambda: {"eth0": "lan", "eth1": "wan", "ppp0": "wan"})
    lan_ip: int | None = None
    wan_ip: int | None = None
    policies: dict[str, int] = field(default_factory=lambda: {"input": 0, "forward": 3, "output": 0})


# ----------------------------------------------------------------- lexing


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) per command: backslash-newline joins lines."""
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not buf:
            start = n
        stripped = line.rstrip()
        if stripped.endswith("\\") and not stripped.lstrip().startswith("#"):
            buf.append(stripped[:-1] + " ")
            continue
        buf.append(line)
        yield start, "".join(buf)
        buf = []
    if buf:
        yield start, "".join(buf)


def split_words(line: str) -> list[str]:
    """Shell-like words: quotes, backslash escapes, ``#`` comments at a word start."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t\v\f\r":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
        elif c == "#" and not in_word:
            break
        elif c == "'":
            j = line.find("'", i + 1)
            if j < 0:
                raise Bad("unterminated ' quote")
            cur.append(line[i + 1 : j])
            in_word, i = True, j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise Bad('unterminated " quote')
                d = line[i]
                if d == '"':
                    break
                if d == "\\" and i + 1 < n and line[i + 1] in '"\\$`':
                    i += 1
                    d = line[i]
                cur.append(d)
                i += 1
            in_word, i = True, i + 1
        elif c == "\\":
            if i + 1 < n:
                cur.append(line[i + 1])
            in_word, i = True, i + 2
        else:
            cur.append(c)
            in_word, i = True, i + 1
    if in_word:
        words.append("".join(cur))
    return words


def _printable(s: str) -> str:
    s = s if len(s) <= 40 else s[:37] + "..."
    return repr(s)


# ----------------------------------------------------------------- values


def parse_addr(tok: str) -> tuple[int, int]:
    """``a.b.c.d[/bits|/mask]`` or ``0/0`` -> (address, mask)."""
    if "/" in tok:
        a, m = tok.split("/", 1)
    else:
        a, m = tok, "32"
    if a == "0":
        a = "0.0.0.0"
    if not _ADDR.match(a):
        if re.match(r"[A-Za-z]", a):
            raise Bad(f"host name {_printable(a)}: write an IPv4 address")
        raise Bad(f"bad address {_printable(tok)}")
    octets = [int(x) for x in a.split(".")]
    if any(o > 255 for o in octets):
        raise Bad(f"bad address {_printable(tok)}: octet above 255")
    addr = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
    if m.isdigit() and len(m) <= 2:
        bits = int(m)
        if bits > 32:
            raise Bad(f"bad prefix length /{m} in {_printable(tok)}")
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    elif _ADDR.match(m) and all(int(x) <= 255 for x in m.split(".")):
        o = [int(x) for x in m.split(".")]
        mask = (o[0] << 24) | (o[1] << 16) | (o[2] << 8) | o[3]
    else:
        raise Bad(f"bad netmask {_printable(m)} in {_printable(tok)}")
    return addr & mask, mask


def parse_host(tok: str) -> int:
    addr, mask = parse_addr(tok)
    if mask != 0xFFFFFFFF or "/" in tok:
        raise Bad(f"expected a host address, got {_printable(tok)}")
    return addr


def _port_number(tok: str, proto: int) -> int:
    top = 255 if proto == ICMP else 65535
    if tok.isdigit() and len(tok) <= 5:
        v = int(tok)
        if v > top:
            raise Bad(f"{'ICMP type' if proto == ICMP else 'port'} {tok} above {top}")
        return v
    if proto != ICMP and tok in SERVICES:
        return SERVICES[tok]
    if proto == ICMP:
        raise Bad(f"unknown ICMP type {_printable(tok)}")
    raise Bad(f"bad port {_printable(tok)}")


def parse_ports(tok: str, proto: int, allow_list: bool = False) -> tuple[Ports, int | None]:
    """A port, ``lo:hi``, ``:hi``, ``lo:`` (or an ICMP type name) -> (ranges, ICMP code or None)."""
    if proto == ICMP and tok.lower() in ICMP_TYPES:
        t, code = ICMP_TYPES[tok.lower()]
        return ((t, t),), code
    top = 255 if proto == ICMP else 65535
    out: list[tuple[int, int]] = []
    pieces = tok.split(",") if allow_list else [tok]
    for piece in pieces:
        if ":" in piece:
            lo_s, hi_s = piece.split(":", 1)
            lo = _port_number(lo_s, proto) if lo_s else 0
            hi = _port_number(hi_s, proto) if hi_s else top
            if lo > hi:
                raise Bad(f"empty port range {_printable(piece)}")
        else:
            lo = hi = _port_number(piece, proto)
        out.append((lo, hi))
    return tuple(out), None


def parse_proto(tok: str, numbers: bool = True) -> int:
    low = tok.lower()
    if low in PROTO_BY_NAME:
        return PROTO_BY_NAME[low]
    if numbers and tok.isdigit() and len(tok) <= 3 and int(tok) <= 255:
        return int(tok)
    raise Bad(f"unknown protocol {_printable(tok)}")


def _is_option(tok: str) -> bool:
    return len(tok) > 1 and tok[0] == "-"


def _suggest(opt: str, valid: set[str]) -> str:
    """``-0`` -> ``: did you mean -O (letter O)?``"""
    for a, b, what in (("0", "O", "letter O, not zero"), ("1", "l", "letter l"), ("1", "I", "letter I")):
        alt = opt.replace(a, b)
        if alt != opt and alt in valid:
            return f" (a {'zero' if a == '0' else 'digit one'}): did you mean {alt} ({what})?"
    return ""


# ----------------------------------------------------------------- rule specification


@dataclass
class Spec:
    """A rule as written, before the protocol-dependent checks."""

    proto: int = 0
    proto_neg: bool = False
    proto_set: bool = False
    src: tuple[int, int] = (0, 0)
    src_neg: bool = False
    dst: tuple[int, int] = (0, 0)
    dst_neg: bool = False
    sport: str | None = None
    sport_neg: bool = False
    dport: str | None = None
    dport_neg: bool = False
    icmp: str | None = None
    icmp_neg: bool = False
    ifaces: frozenset[str] | None = None
    iface_name: str = ""
    iface_neg: bool = False
    syn: int = 0
    frag: int = 0
    log: bool = False
    bidir: bool = False
    target: str = ""
    port_list: bool = False  # ipfwadm: several ports per side


# ----------------------------------------------------------------- the program


class Program:
    """Mutable chains and forwards, built by executing rule lines in order."""

    def __init__(self, env: Env | None = None) -> None:
        self.env = env or Env()
        self.chains: dict[str, Chain] = {n: Chain(n, self.env.policies.get(n, 0)) for n in BUILTIN_CHAINS}
        self.portfw: list[PortForward] = []
        self.protofw: list[ProtoForward] = []
        self.errors: list[str] = []
        self.nrules = 0

    # .............................................................. entry points

    def feed_text(self, text: str, source: str) -> None:
        """Execute every command line of ``text``; errors are ``SOURCE:LINE: reason``."""
        for lineno, line in logical_lines(text):
            if len(self.errors) >= MAX_ERRORS:
                self.errors.append(f"{source}:{lineno}: too many errors, stopping")
                return
            where = f"{source}:{lineno}"
            if len(line) > MAX_LINE:
                self.errors.append(f"{where}: line longer than {MAX_LINE} characters")
                continue
            try:
                words = split_words(line)
            except Bad as exc:
                self.errors.append(f"{where}: {exc}")
                continue
            if words:
                self.feed_argv(words, where)

    def feed_argv(self, argv: list[str], where: str) -> bool:
        """Execute one command; on refusal record ``WHERE: reason`` and change nothing."""
        try:
            self._command(list(argv), where)
            return True
        except Bad as exc:
            self.errors.append(f"{where}: {exc}")
            return False
        except (ValueError, OverflowError) as exc:  # belt and braces: never a traceback
            self.errors.append(f"{where}: {exc}")
            return False

    def finish(self) -> None:
        """Checks that need the whole rule set: MASQ reached from input or output."""
        masq_at: dict[str, str] = {}
        for name, ch in self.chains.items():
            if not ch.builtin:
                hit = self._reaches_masq(name, set())
                if hit is not None:
                    masq_at[name] = hit
        for name in ("input", "output"):
            for r in self.chains[name].rules:
                if r.target in masq_at:
                    self.errors.append(
                        f"{r.origin}: {name} jumps to chain {r.target!r}, which reaches MASQ "
                        f"({masq_at[r.target]}); MASQ is only allowed from the forward chain"
                    )

    def _reaches_masq(self, name: str, seen: set[str]) -> str | None:
        if name in seen:
            return None
        seen.add(name)
        for r in self.chains[name].rules:
            if r.target == "MASQ":
                return r.origin
            if r.target in self.chains and not self.chains[r.target].builtin:
                hit = self._reaches_masq(r.target, seen)
                if hit is not None:
                    return hit
        return None

    # .............................................................. dispatch

    def _command(self, argv: list[str], where: str) -> None:
        if argv and argv[-1] == "&":  # "ipfwd --masq 10.0.0.2 50 &" from rc.local
            argv = argv[:-1]
        if not argv:
            raise Bad("empty command")
        tool = argv[0].rsplit("/", 1)[-1]
        args = argv[1:]
        if tool == "ipchains":
            self._ipchains(args, where)
        elif tool == "ipfwadm":
            self._ipfwadm(args, where)
        elif tool == "ipportfw":
            self._ipportfw(args)
        elif tool == "ipmasqadm":
            if not args or args[0] != "portfw":
                what = _printable(args[0]) if args else "nothing"
                raise Bad(f"ipmasqadm: only the portfw module is supported, got {what}")
            self._ipmasqadm_portfw(args[1:])
        elif tool == "ipfwd":
            self._ipfwd(args)
        else:
            raise Bad(
                f"unknown command {_printable(argv[0])} (expected ipchains, ipfwadm, ipmasqadm, ipportfw or ipfwd)"
            )

    # .............................................................. interfaces

    def iface(self, name: str) -> frozenset[str]:
        """An interface name (or ``ppp+`` wildcard) -> the set of sides it stands for."""
        if name in IFACES:
            return frozenset((name,))
        al = self.env.aliases
        if name in al:
            return frozenset((al[name],))
        if name.endswith("+") and len(name) > 1:
            pre = name[:-1]
            sides = {v for k, v in al.items() if k.startswith(pre)} | {s for s in IFACES if s.startswith(pre)}
            if sides:
                return frozenset(sides)
        known = ", ".join(f"{k}={v}" for k, v in sorted(al.items()))
        raise Bad(f"unknown interface {_printable(name)} (known: {known}; map it in firewall.aliases)")

    def iface_by_addr(self, tok: str) -> frozenset[str]:
        """``ipfwadm -V ADDR``: the side whose address is ADDR."""
        if tok in self.env.aliases:
            return frozenset((self.env.aliases[tok],))
        if tok in WAN_SYMBOLS:
            return frozenset(("wan",))
        if tok in LAN_SYMBOLS:
            return frozenset(("lan",))
        addr = parse_host(tok)
        if addr == self.env.lan_ip:
            return frozenset(("lan",))
        if addr == self.env.wan_ip:
            return frozenset(("wan",))
        mine = []
        if self.env.lan_ip is not None:
            mine.append(f"LAN {ip_str(self.env.lan_ip)}")
        if self.env.wan_ip is not None:
            mine.append(f"WAN {ip_str(self.env.wan_ip)}")
        raise Bad(
            f"-V {tok} is not an address of masqd ({', '.join(mine) or 'none known'}); "
            f"map it in firewall.aliases, e.g. \"{tok}\" = \"wan\""
        )

    # .............................................................. chains

    def _chain(self, name: str) -> Chain:
        ch = self.chains.get(name)
        if ch is None:
            hint = " (built-in chains are lower case)" if name.lower() in BUILTIN_CHAINS else ""
            raise Bad(f"no chain {_printable(name)}{hint}")
        return ch

    def new_chain(self, name: str) -> None:
        if name in self.chains:
            raise Bad(f"chain {name!r} already exists")
        if name in TERMINAL or name in ("RETURN", "REDIRECT") or name.lower() in BUILTIN_CHAINS:
            raise Bad(f"{name!r} is reserved and cannot name a chain")
        if not _CHAIN_NAME.match(name):
            raise Bad(f"bad chain name {_printable(name)} (letters, digits, _ . -, at most 31)")
        self.chains[name] = Chain(name)

    def _reachable(self, start: str, goal: str) -> list[str] | None:
        """A path of jumps start -> ... -> goal, or None."""
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        seen: set[str] = set()
        while stack:
            name, path = stack.pop()
            if name == goal:
                return path
            if name in seen:
                continue
            seen.add(name)
            for r in self.chains[name].rules:
                if r.target in self.chains and not self.chains[r.target].builtin:
                    stack.append((r.target, path + [r.target]))
        return None

    def _check_target(self, chain: str, target: str) -> None:
        if not target or target in TERMINAL or target == "RETURN":
            if target == "MASQ" and chain in ("input", "output"):
                raise Bad(f"MASQ is only allowed in the forward chain, not in {chain}")
            return
        if target == "REDIRECT":
            raise Bad("REDIRECT is not supported")
        if target in self.chains:
            if self.chains[target].builtin:
                raise Bad(f"cannot jump to built-in chain {target!r}")
            path = self._reachable(target, chain)
            if path is not None:
                raise Bad(f"jump to {target!r} makes a loop: {chain} -> {' -> '.join(path)}")
            return
        if target.upper() in TERMINAL or target.upper() == "RETURN":
            raise Bad(f"unknown target {target!r} (targets are upper case: {target.upper()})")
        raise Bad(f"jump to missing chain {target!r} (create it first with -N)")

    def _insert(self, chain: str, pos: int, rules: list[Rule]) -> None:
        if self.nrules + len(rules) > MAX_RULES:
            raise Bad(f"more than {MAX_RULES} rules")
        ch = self._chain(chain)
        for r in rules:
            self._check_target(chain, r.target)
        ch.rules[pos:pos] = rules
        self.nrules += len(rules)

    def _delete_spec(self, chain: str, rules: list[Rule]) -> None:
        ch = self._chain(chain)
        idx = []
        for r in rules:
            k = r.key()
            for i, old in enumerate(ch.rules):
                if i not in idx and old.key() == k:
                    idx.append(i)
                    break
            else:
                raise Bad(f"no rule like '{r.spec()}' in chain {chain} to delete")
        for i in sorted(idx, reverse=True):
            del ch.rules[i]
        self.nrules -= len(idx)

    def _flush(self, chain: str | None) -> None:
        chains = [self._chain(chain)] if chain is not None else list(self.chains.values())
        for ch in chains:
            self.nrules -= len(ch.rules)
            ch.rules.clear()

    def _delete_chain(self, name: str | None) -> None:
        if name is None:
            users = [n for n, c in self.chains.items() if not c.builtin]
            for b in BUILTIN_CHAINS:
                for r in self.chains[b].rules:
                    if r.target in users:
                        raise Bad(f"chain {r.target!r} is still used by {b} ({r.origin})")
            for n in users:
                self.nrules -= len(self.chains[n].rules)
                del self.chains[n]
            return
        ch = self._chain(name)
        if ch.builtin:
            raise Bad(f"cannot delete built-in chain {name!r}")
        if ch.rules:
            raise Bad(f"chain {name!r} is not empty (flush it with -F first)")
        for other in self.chains.values():
            for r in other.rules:
                if r.target == name:
                    raise Bad(f"chain {name!r} is still used by {other.name} ({r.origin})")
        del self.chains[name]

    def set_policy(self, chain: str, verdict: int, where: str) -> None:
        ch = self._chain(chain)
        if not ch.builtin:
            raise Bad(f"only built-in chains have a policy, not {chain!r}")
        if verdict == MASQ and chain != "forward":
            raise Bad(f"MASQ policy is only allowed for the forward chain, not {chain}")
        ch.policy = verdict
        ch.policy_origin = where

    # .............................................................. rules from a spec

    def _rules(self, chain: str, sp: Spec, where: str) -> list[Rule]:
        """Protocol-dependent checks, then one Rule (two with -b)."""
        p = sp.proto
        has_ports = sp.sport is not None or sp.dport is not None or sp.icmp is not None
        if has_ports and (sp.proto_neg or p not in (TCP, UDP, ICMP)):
            raise Bad("ports or ICMP types need -p tcp, udp or icmp")
        if sp.icmp is not None and p != ICMP:
            raise Bad("--icmp-type needs -p icmp")
        if sp.syn and (p != TCP or sp.proto_neg):
            raise Bad("-y (SYN) needs -p tcp")
        if sp.frag > 0 and (has_ports or sp.syn):
            raise Bad("-f cannot be combined with ports, ICMP types or -y: non-first fragments have none")
        sports: Ports = ()
        dports: Ports = ()
        sneg, dneg = sp.sport_neg, sp.dport_neg
        if sp.sport is not None:
            sports, code = parse_ports(sp.sport, p, sp.port_list)
            if code is not None and sp.sport_neg:
                raise Bad(f"'! {sp.sport}' cannot be negated (it fixes type and code); negate the type number")
            if code is not None:
                if sp.dport is not None:
                    raise Bad(f"ICMP type {sp.sport!r} fixes the code: no destination port allowed")
                dports, dneg = ((code, code),), sp.sport_neg
        if sp.icmp is not None:
            if sp.sport is not None:
                raise Bad("ICMP type given twice (source port and --icmp-type)")
            sports, code = parse_ports(sp.icmp, p)
            sneg = sp.icmp_neg
            if code is not None and sneg:
                raise Bad(f"'! {sp.icmp}' cannot be negated (it fixes type and code); negate the type number")
            if code is not None:
                if sp.dport is not None:
                    raise Bad(f"ICMP type {sp.icmp!r} fixes the code: no destination port allowed")
                dports, dneg = ((code, code),), sp.icmp_neg
        if sp.dport is not None:
            dports, _ = parse_ports(sp.dport, p, sp.port_list)
        if sp.target == "MASQ" and chain in ("input", "output"):
            raise Bad(f"MASQ is only allowed in the forward chain, not in {chain}")
        r = Rule(
            chain, sp.target, p, sp.proto_neg, sp.src[0], sp.src[1], sp.src_neg, sports, sneg,
            sp.dst[0], sp.dst[1], sp.dst_neg, dports, dneg, sp.ifaces, sp.iface_name, sp.iface_neg,
            sp.syn, sp.frag, sp.log, where,
        )
        if not sp.bidir:
            return [r]
        back = Rule(
            chain, sp.target, p, sp.proto_neg, sp.dst[0], sp.dst[1], sp.dst_neg, dports, dneg,
            sp.src[0], sp.src[1], sp.src_neg, sports, sneg, sp.ifaces, sp.iface_name, sp.iface_neg,
            sp.syn, sp.frag, sp.log, where,
        )
        return [r] if back.key() == r.key() else [r, back]

    # .............................................................. ipchains

    _IPCHAINS_LONG = {
        "--append": "-A", "--insert": "-I", "--delete": "-D", "--replace": "-R", "--flush": "-F",
        "--delete-chain": "-X", "--new-chain": "-N", "--policy": "-P", "--protocol": "-p",
        "--proto": "-p", "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d",
        "--source-port": "--sport", "--destination-port": "--dport", "--jump": "-j",
        "--interface": "-i", "--syn": "-y", "--fragment": "-f", "--log": "-l",
        "--bidirectional": "-b", "--verbose": "-v", "--numeric": "-n", "--exact": "-x",
        "--list": "-L", "--zero": "-Z", "--check": "-C", "--masquerading": "-M", "--set": "-S",
        "--help": "-h", "--mark": "-m", "--TOS": "-t", "--output": "-o",
    }
    _IPCHAINS_VALID = {
        "-A", "-I", "-D", "-R", "-F", "-X", "-N", "-P", "-p", "-s", "-d", "--sport", "--dport",
        "--icmp-type", "-j", "-i", "-y", "-f", "-l", "-b", "-v", "-n", "-x",
    }

    def _ipchains(self, args: list[str], where: str) -> None:
        cmd: str | None = None
        chain: str | None = None
        num: int | None = None
        policy: str | None = None
        sp = Spec()
        seen: set[str] = set()
        neg = False
        i, n = 0, len(args)

        def value(opt: str) -> tuple[bool, str]:
            nonlocal i, neg
            ng, neg = neg, False
            if i < n and args[i] == "!":
                if ng:
                    raise Bad(f"'!' given twice for {opt}")
                ng = True
                i += 1
            if i >= n or _is_option(args[i]):
                raise Bad(f"option {opt} needs a value")
            i += 1
            return ng, args[i - 1]

        def opt_port() -> tuple[bool, str] | None:
            nonlocal i
            if i < n and args[i] == "!" and i + 1 < n and not _is_option(args[i + 1]):
                i += 2
                return True, args[i - 1]
            if i < n and args[i] != "!" and not _is_option(args[i]):
                i += 1
                return False, args[i - 1]
            return None

        def positional() -> str | None:
            nonlocal i
            if i < n and not _is_option(args[i]) and args[i] != "!":
                i += 1
                return args[i - 1]
            return None

        while i < n:
            a = args[i]
            i += 1
            if a == "!":
                if neg:
                    raise Bad("'!' given twice")
                neg = True
                continue
            o = self._IPCHAINS_LONG.get(a, a)
            if o in ("-A", "-I", "-D", "-R", "-F", "-X", "-N", "-P"):
                if neg:
                    raise Bad(f"'!' cannot negate {a}")
                if cmd is not None:
                    raise Bad(f"only one command per line ({cmd} and {a})")
                cmd = o
                chain = positional()
                if chain is None and o not in ("-F", "-X"):
                    raise Bad(f"{a} needs a chain name")
                if o in ("-I", "-D", "-R"):
                    if i < n and args[i].isdigit():
                        num = int(args[i][:9])
                        i += 1
                    elif o == "-R":
                        raise Bad("-R needs a rule number")
                if o == "-P":
                    policy = positional()
                    if policy is None:
                        raise Bad("-P needs a chain and a target")
                continue
            if o in ("-L", "-Z", "-C", "-M", "-S", "-h"):
                raise Bad(f"ipchains {a} is not supported in a rules file")
            if o in ("-m", "-t", "-o"):
                raise Bad(f"ipchains {a} is not supported")
            if o in seen and o not in ("-v", "-n", "-x"):
                raise Bad(f"option {a} given twice")
            seen.add(o)
            if o == "-p":
                sp.proto_neg, tok = value(a)
                sp.proto = parse_proto(tok)
                sp.proto_set = True
            elif o in ("-s", "-d"):
                ng, tok = value(a)
                addr = parse_addr(tok)
                port = opt_port()
                if o == "-s":
                    sp.src, sp.src_neg = addr, ng
                    if port is not None:
                        sp.sport_neg, sp.sport = port
                else:
                    sp.dst, sp.dst_neg = addr, ng
                    if port is not None:
                        sp.dport_neg, sp.dport = port
            elif o in ("--sport", "--dport"):
                ng, tok = value(a)
                if o == "--sport":
                    if sp.sport is not None:
                        raise Bad("source port given twice")
                    sp.sport_neg, sp.sport = ng, tok
                else:
                    if sp.dport is not None:
                        raise Bad("destination port given twice")
                    sp.dport_neg, sp.dport = ng, tok
            elif o == "--icmp-type":
                sp.icmp_neg, sp.icmp = value(a)
            elif o == "-i":
                sp.iface_neg, tok = value(a)
                sp.ifaces, sp.iface_name = self.iface(tok), tok
            elif o == "-j":
                ng, tok = value(a)
                if ng:
                    raise Bad("'!' cannot negate -j")
                sp.target = tok
            elif o in ("-y", "-f"):
                v = -1 if neg else 1
                neg = False
                if o == "-y":
                    sp.syn = v
                else:
                    sp.frag = v
            elif o == "-l":
                sp.log = True
            elif o == "-b":
                sp.bidir = True
            elif o in ("-v", "-n", "-x"):
                pass
            elif _is_option(a):
                raise Bad(f"unknown option {_printable(a)}{_suggest(a, self._IPCHAINS_VALID)}")
            else:
                raise Bad(f"unexpected argument {_printable(a)}")
            if neg and o not in ("-y", "-f"):
                raise Bad(f"'!' cannot negate {a}")
        if neg:
            raise Bad("'!' at the end of the line")
        if cmd is None:
            raise Bad("no command (-A, -I, -D, -R, -F, -X, -N or -P)")
        rule_opts = seen - {"-v", "-n", "-x"}
        if cmd in ("-F", "-X", "-N", "-P") or (cmd == "-D" and num is not None):
            if rule_opts:
                raise Bad(f"{cmd} takes no rule options (got {', '.join(sorted(rule_opts))})")
            if cmd == "-F":
                self._flush(chain)
            elif cmd == "-X":
                self._delete_chain(chain)
            elif cmd == "-N":
                assert chain is not None
                self.new_chain(chain)
            elif cmd == "-P":
                assert chain is not None and policy is not None
                if policy not in VERDICT_BY_NAME:
                    hint = " (targets are upper case)" if policy.upper() in VERDICT_BY_NAME else ""
                    raise Bad(f"bad policy {_printable(policy)}{hint}: ACCEPT, DENY, REJECT or MASQ")
                self.set_policy(chain, VERDICT_BY_NAME[policy], where)
            else:
                assert chain is not None and num is not None
                ch = self._chain(chain)
                if not 1 <= num <= len(ch.rules):
                    raise Bad(f"chain {chain} has no rule {num}")
                del ch.rules[num - 1]
                self.nrules -= 1
            return
        assert chain is not None
        ch = self._chain(chain)
        rules = self._rules(chain, sp, where)
        if cmd == "-A":
            self._insert(chain, len(ch.rules), rules)
        elif cmd == "-I":
            pos = 1 if num is None else num
            if not 1 <= pos <= len(ch.rules) + 1:
                raise Bad(f"cannot insert at {pos}: chain {chain} has {len(ch.rules)} rules")
            self._insert(chain, pos - 1, rules)
        elif cmd == "-R":
            assert num is not None
            if not 1 <= num <= len(ch.rules):
                raise Bad(f"chain {chain} has no rule {num}")
            if len(rules) != 1:
                raise Bad("-R cannot be used with -b")
            old = ch.rules[num - 1]
            del ch.rules[num - 1]
            self.nrules -= 1
            try:
                self._insert(chain, num - 1, rules)
            except Bad:
                ch.rules.insert(num - 1, old)
                self.nrules += 1
                raise
        else:  # -D by specification
            self._delete_spec(chain, rules)

    # .............................................................. ipfwadm

    _IPFWADM_VALID = {
        "-I", "-O", "-F", "-a", "-i", "-d", "-f", "-p", "-P", "-S", "-D", "-V", "-W", "-b", "-m", "-o",
        "-y", "-e", "-n", "-v", "-x",
    }
    _IPFWADM_POLICIES = ("accept", "deny", "reject", "masquerade")

    def _ipfwadm_policy(self, tok: str) -> str:
        low = tok.lower()
        hits = [p for p in self._IPFWADM_POLICIES if low and p.startswith(low)]
        if len(hits) != 1:
            raise Bad(f"bad policy {_printable(tok)}: accept, deny, reject or masquerade")
        return {"accept": "ACCEPT", "deny": "DENY", "reject": "REJECT", "masquerade": "MASQ"}[hits[0]]

    def _ipfwadm(self, args: list[str], where: str) -> None:
        cat: str | None = None
        cmd: str | None = None
        policy: str | None = None
        sp = Spec(port_list=True)
        masq = False
        w_sides: frozenset[str] | None = None
        v_sides: frozenset[str] | None = None
        w_name = v_name = ""
        seen: set[str] = set()
        i, n = 0, len(args)

        def value(opt: str) -> str:
            nonlocal i
            if i >= n or _is_option(args[i]):
                raise Bad(f"option {opt} needs a value")
            i += 1
            return args[i - 1]

        def ports() -> str | None:
            nonlocal i
            got = []
            while i < n and not _is_option(args[i]):
                got.append(args[i])
                i += 1
            if len(got) > 10:
                raise Bad("at most 10 ports per address")
            return ",".join(got) if got else None

        while i < n:
            a = args[i]
            i += 1
            if a in ("-I", "-O", "-F"):
                if cat is not None:
                    raise Bad("only one of -I, -O, -F per line")
                cat = {"-I": "input", "-O": "output", "-F": "forward"}[a]
                continue
            if a == "-A":
                raise Bad("ipfwadm -A (accounting) is not supported")
            if a == "-M":
                raise Bad("ipfwadm -M (masquerade listing and timeouts) is not supported")
            if a in ("-l", "-z", "-c", "-h"):
                raise Bad(f"ipfwadm {a} is not supported in a rules file")
            if a in ("-a", "-i", "-d", "-f", "-p"):
                if cmd is not None:
                    raise Bad(f"only one command per line ({cmd} and {a})")
                cmd = a
                if a != "-f":
                    policy = self._ipfwadm_policy(value(a))
                continue
            if a in seen and a not in ("-e", "-n", "-v", "-x"):
                raise Bad(f"option {a} given twice")
            seen.add(a)
            if a == "-P":
                tok = value(a)
                if tok.lower() not in ("tcp", "udp", "icmp", "all"):
                    raise Bad(f"ipfwadm -P accepts tcp, udp, icmp or all, not {_printable(tok)} (use ipchains -p)")
                sp.proto = PROTO_BY_NAME[tok.lower()]
                sp.proto_set = True
            elif a in ("-S", "-D"):
                addr = parse_addr(value(a))
                port = ports()
                if a == "-S":
                    sp.src, sp.sport = addr, port
                else:
                    sp.dst, sp.dport = addr, port
            elif a == "-W":
                w_name = value(a)
                w_sides = self.iface(w_name)
            elif a == "-V":
                v_name = value(a)
                v_sides = self.iface_by_addr(v_name)
            elif a == "-b":
                sp.bidir = True
            elif a == "-m":
                masq = True
            elif a == "-o":
                sp.log = True
            elif a == "-y":
                sp.syn = 1
            elif a == "-k":
                raise Bad("ipfwadm -k (ACK) is not supported")
            elif a == "-r":
                raise Bad("ipfwadm -r (redirect) is not supported")
            elif a == "-t":
                raise Bad("ipfwadm -t (TOS masks) is not supported")
            elif a in ("-e", "-n", "-v", "-x"):
                pass
            elif _is_option(a):
                raise Bad(f"unknown option {_printable(a)}{_suggest(a, self._IPFWADM_VALID)}")
            else:
                raise Bad(f"unexpected argument {_printable(a)}")
        if cat is None:
            raise Bad("no category (-I input, -O output or -F forward)")
        if cmd is None:
            raise Bad("no command (-a, -i, -d, -f or -p)")
        if w_sides is not None and v_sides is not None:
            both = w_sides & v_sides
            if not both:
                raise Bad(f"-W {w_name} and -V {v_name} name different interfaces")
            sp.ifaces, sp.iface_name = both, w_name
        elif w_sides is not None:
            sp.ifaces, sp.iface_name = w_sides, w_name
        elif v_sides is not None:
            sp.ifaces, sp.iface_name = v_sides, v_name
        rule_opts = seen - {"-e", "-n", "-v", "-x"}
        if cmd in ("-f", "-p"):
            if rule_opts:
                raise Bad(f"{cmd} takes no rule options (got {', '.join(sorted(rule_opts))})")
            if cmd == "-f":
                self._flush(cat)
            else:
                assert policy is not None
                self.set_policy(cat, VERDICT_BY_NAME[policy], where)
            return
        assert policy is not None
        if masq:
            if cat != "forward":
                raise Bad("-m (masquerade) is only valid with -F (forward)")
            if policy not in ("ACCEPT", "MASQ"):
                raise Bad(f"-m (masquerade) goes with accept, not {policy.lower()}")
            policy = "MASQ"
        if policy == "MASQ" and cat != "forward":
            raise Bad(f"masquerade is only allowed with -F (forward), not {cat}")
        sp.target = policy
        rules = self._rules(cat, sp, where)
        if cmd == "-a":
            self._insert(cat, len(self.chains[cat].rules), rules)
        elif cmd == "-i":
            self._insert(cat, 0, rules)
        else:
            self._delete_spec(cat, rules)

    # .............................................................. forwarders

    def _listen(self, tok: str) -> str:
        if tok in WAN_SYMBOLS:
            return "wan"
        return ip_str(parse_host(tok))

    def _portfw(self, proto: str, listen: str, port: str, to: str, to_port: str, pref: str | None) -> PortForward:
        lp = _port_number(port, TCP)
        tp = _port_number(to_port, TCP)
        if lp == 0 or tp == 0:
            raise Bad("port 0 cannot be forwarded")
        pr = 10
        if pref is not None:
            if not pref.isdigit() or not 1 <= int(pref[:9]) <= 1_000_000:
                raise Bad(f"bad preference {_printable(pref)} (a number from 1)")
            pr = int(pref)
        return PortForward(
            proto=proto, listen=self._listen(listen), port=lp, to=ip_str(parse_host(to)), to_port=tp, pref=pr  # type: ignore[arg-type]
        )

    def _split_addr_port(self, tok: str) -> tuple[str, str]:
        if "/" not in tok:
            raise Bad(f"expected ADDR/PORT, got {_printable(tok)}")
        a, p = tok.rsplit("/", 1)
        return a, p

    def _ipportfw(self, args: list[str]) -> None:
        if args == ["-C"]:
            self.portfw.clear()
            return
        if not args:
            raise Bad("ipportfw needs -C, -A or -D")
        cmd = args[0]
        if cmd in ("-L", "-l"):
            raise Bad("ipportfw -L is not supported in a rules file")
        if cmd not in ("-A", "-D"):
            raise Bad(f"unknown ipportfw command {_printable(cmd)} (expected -C, -A or -D)")
        proto = local = remote = pref = None
        i, n = 1, len(args)
        while i < n:
            a = args[i]
            if a in ("-t", "-u", "-R", "-p") and (i + 1 >= n or _is_option(args[i + 1])):
                raise Bad(f"option {a} needs a value")
            if a in ("-t", "-u"):
                if proto is not None:
                    raise Bad("give one of -t or -u")
                proto, local = ("tcp" if a == "-t" else "udp"), args[i + 1]
            elif a == "-R":
                remote = args[i + 1]
            elif a == "-p":
                pref = args[i + 1]
            elif _is_option(a):
                raise Bad(f"unknown ipportfw option {_printable(a)}")
            else:
                raise Bad(f"unexpected argument {_printable(a)}")
            i += 2
        if proto is None or local is None:
            raise Bad("ipportfw needs -t ADDR/PORT or -u ADDR/PORT")
        if remote is None:
            raise Bad("ipportfw needs -R ADDR/PORT")
        la, lp = self._split_addr_port(local)
        ra, rp = self._split_addr_port(remote)
        fw = self._portfw(proto, la, lp, ra, rp, pref)
        if cmd == "-A":
            self.portfw.append(fw)
        else:
            self._remove_portfw(fw, match_remote=True)

    def _remove_portfw(self, fw: PortForward, match_remote: bool) -> None:
        for j, old in enumerate(self.portfw):
            if (old.proto, old.listen, old.port) == (fw.proto, fw.listen, fw.port) and (
                not match_remote or (old.to, old.to_port) == (fw.to, fw.to_port)
            ):
                del self.portfw[j]
                return
        raise Bad(f"no such port forward {fw.proto} {fw.listen}:{fw.port} to delete")

    def _ipmasqadm_portfw(self, args: list[str]) -> None:
        cmd: str | None = None
        proto = pref = None
        local: tuple[str, str] | None = None
        remote: tuple[str, str] | None = None
        i, n = 0, len(args)
        while i < n:
            a = args[i]
            i += 1
            if a in ("-a", "-d", "-f"):
                if cmd is not None:
                    raise Bad(f"only one command per line ({cmd} and {a})")
                cmd = a
            elif a == "-l":
                raise Bad("ipmasqadm portfw -l is not supported in a rules file")
            elif a == "-n":
                pass
            elif a in ("-P", "-p"):
                if i >= n or _is_option(args[i]):
                    raise Bad(f"option {a} needs a value")
                if a == "-P":
                    proto = args[i].lower()
                    if proto not in ("tcp", "udp"):
                        raise Bad(f"portfw forwards tcp or udp, not {_printable(args[i])}")
                else:
                    pref = args[i]
                i += 1
            elif a in ("-L", "-R"):
                if i + 1 >= n or _is_option(args[i]) or _is_option(args[i + 1]):
                    raise Bad(f"option {a} needs an address and a port")
                pair = (args[i], args[i + 1])
                i += 2
                if a == "-L":
                    local = pair
                else:
                    remote = pair
            elif _is_option(a):
                raise Bad(f"unknown ipmasqadm portfw option {_printable(a)}")
            else:
                raise Bad(f"unexpected argument {_printable(a)}")
        if cmd is None:
            raise Bad("ipmasqadm portfw needs -a, -d or -f")
        if cmd == "-f":
            if proto or local or remote or pref:
                raise Bad("-f takes no other options")
            self.portfw.clear()
            return
        if proto is None:
            raise Bad("ipmasqadm portfw needs -P tcp or -P udp")
        if local is None:
            raise Bad("ipmasqadm portfw needs -L ADDR PORT")
        if cmd == "-a":
            if remote is None:
                raise Bad("ipmasqadm portfw -a needs -R ADDR PORT")
            self.portfw.append(self._portfw(proto, local[0], local[1], remote[0], remote[1], pref))
            return
        r = remote or ("0.0.0.1", "1")
        fw = self._portfw(proto, local[0], local[1], r[0], r[1], None)
        self._remove_portfw(fw, match_remote=remote is not None)

    def _ipfwd(self, args: list[str]) -> None:
        if len(args) != 3 or args[0] != "--masq":
            raise Bad("expected: ipfwd --masq HOST PROTO")
        host = ip_str(parse_host(args[1]))
        proto = parse_proto(args[2])
        if proto in (0, TCP, UDP):
            raise Bad(f"ipfwd forwards a whole IP protocol such as 47 or 50, not {args[2]} (use ipportfw for tcp/udp)")
        self.protofw = [p for p in self.protofw if p.proto != proto]
        self.protofw.append(ProtoForward(proto=proto, to=host))  # type: ignore[arg-type]


def policy_name(v: int | None) -> str:
    return VERDICT_NAMES.get(v, "-") if v is not None else "-"
