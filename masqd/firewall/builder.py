"""The rule set as rule lines build it up, and the operations every dialect shares.

A ``Builder`` holds the chains (with policies and rules) and the port and
protocol forwards; each dialect (``masqd.firewall.dialects``) turns one command
line into calls here: create or delete a chain, insert or delete rules made
from a ``Spec``, set a policy, add or remove a forward. A refused operation
raises ``Bad`` and changes nothing. Interface names map to ``lan``/``wan``
(or ``lo``) through ``Env.aliases``; ``ipfwadm -V ADDR`` maps by comparing with
masqd's own LAN and WAN addresses. Also kept here: masquerade timeouts set by
``-M -S`` lines, and warnings for what is accepted but deserves a word.

Deliberate choices: user chains may hold MASQ only if no input/output rule
reaches them; the forwarders' WAN side may be a symbol (``wan``, ``$WAN``,
``${4}``) that follows the WAN address; a forward on any address other than
masqd's WAN address is refused.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from masqd.firewall import services
from masqd.firewall.lexer import Bad, printable
from masqd.firewall.model import (
    BUILTIN_CHAINS,
    IFACES,
    LOOPBACK,
    MASQ,
    TERMINAL,
    Chain,
    PortForward,
    ProtoForward,
    Rule,
    ip_str,
)
from masqd.firewall.services import Services
from masqd.firewall.spec import Spec, make_rules
from masqd.firewall.values import TCP, UDP, parse_host, port_number

MAX_RULES = 100_000

WAN_SYMBOLS = {"wan", "WAN", "$WAN", "${WAN}", "$4", "${4}"}
LAN_SYMBOLS = {"lan", "LAN", "$LAN", "${LAN}"}

# Interface names of the HOWTO's scripts -> masqd's sides, before the config's own aliases.
# A key ending in "+" stands for every name it begins (ppp0, ppp1...): the dial-up links of
# the era (PPP, SLIP, ISDN PPP) were the way out to the Internet.
DEFAULT_ALIASES: dict[str, str] = {
    "eth0": "lan", "eth1": "wan", "ppp+": "wan", "slip+": "wan", "ippp+": "wan",
}

# Masquerade timeouts set by ipchains -M -S / ipfwadm -M -s (tcp tcpfin udp), by the names
# of masqd.config.Timeouts; the kernel kept them in jiffies (HZ 100) in an int.
TIMEOUT_NAMES = ("tcp_established", "tcp_fin", "udp")
MAX_TIMEOUT = 0x7FFFFFFF // 100

_CHAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}\Z")


@dataclass
class Env:
    """What the rule language needs to know about the router."""

    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    lan_ip: int | None = None
    wan_ip: int | None = None
    policies: dict[str, int] = field(default_factory=lambda: {"input": 0, "forward": 3, "output": 0})
    services: Services = field(default_factory=services.system)


class Builder:
    """Mutable chains and forwards; the dialects change them one command at a time."""

    def __init__(self, env: Env | None = None) -> None:
        self.env = env or Env()
        self.chains: dict[str, Chain] = {n: Chain(n, self.env.policies.get(n, 0)) for n in BUILTIN_CHAINS}
        self.portfw: list[PortForward] = []
        self.protofw: list[ProtoForward] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.timeouts: dict[str, int] = {}
        self.nrules = 0

    def finish(self) -> None:
        """Checks that need the whole rule set: MASQ reached from input or output; loopback rules."""
        lo = [r for ch in self.chains.values() for r in ch.rules if r.ifaces is not None and LOOPBACK in r.ifaces]
        if lo:
            self.warnings.append(
                f"{lo[0].origin}: {len(lo)} rule(s) name the loopback interface lo (-i lo, -V 127.0.0.1): "
                "masqd routes between its LAN and WAN only and has no loopback side, so they are kept, "
                "listed and counted, but '-i lo' never matches and '-i ! lo' matches every packet"
            )
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

    # .............................................................. interfaces

    def iface(self, name: str) -> frozenset[str]:
        """An interface name (or ``ppp+`` wildcard) -> the set of sides it stands for.

        In order: ``lan``/``wan``; an alias of that exact name; ``lo`` (loopback);
        the longest wildcard alias (``ppp+``) that the name begins with; for a
        wildcard name, every side whose aliases it begins.
        """
        if name in IFACES:
            return frozenset((name,))
        al = self.env.aliases
        if name in al:
            return frozenset((al[name],))
        if name == LOOPBACK:
            return frozenset((LOOPBACK,))
        if not name.endswith("+"):
            wild = [k for k in al if k.endswith("+") and len(k) > 1 and name.startswith(k[:-1])]
            if wild:
                return frozenset((al[max(wild, key=len)],))
        if name.endswith("+") and len(name) > 1:
            pre = name[:-1]
            sides = {v for k, v in al.items() if k.startswith(pre)} | {s for s in IFACES if s.startswith(pre)}
            if sides:
                return frozenset(sides)
        known = ", ".join(f"{k}={v}" for k, v in sorted(al.items()))
        raise Bad(f"unknown interface {printable(name)} (known: {known}; map it in firewall.aliases)")

    def iface_by_addr(self, tok: str) -> frozenset[str]:
        """``ipfwadm -V ADDR``: the side whose address is ADDR."""
        if tok in self.env.aliases:
            return frozenset((self.env.aliases[tok],))
        if tok in WAN_SYMBOLS:
            return frozenset(("wan",))
        if tok in LAN_SYMBOLS:
            return frozenset(("lan",))
        addr = parse_host(tok)
        if addr >> 24 == 127:
            return frozenset((LOOPBACK,))
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

    def chain(self, name: str) -> Chain:
        ch = self.chains.get(name)
        if ch is None:
            hint = " (built-in chains are lower case)" if name.lower() in BUILTIN_CHAINS else ""
            raise Bad(f"no chain {printable(name)}{hint}")
        return ch

    def new_chain(self, name: str) -> None:
        if name in self.chains:
            raise Bad(f"chain {name!r} already exists")
        if name in TERMINAL or name in ("RETURN", "REDIRECT") or name.lower() in BUILTIN_CHAINS:
            raise Bad(f"{name!r} is reserved and cannot name a chain")
        if not _CHAIN_NAME.match(name):
            raise Bad(f"bad chain name {printable(name)} (letters, digits, _ . -, at most 31)")
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

    def insert(self, chain: str, pos: int, rules: list[Rule]) -> None:
        if self.nrules + len(rules) > MAX_RULES:
            raise Bad(f"more than {MAX_RULES} rules")
        ch = self.chain(chain)
        for r in rules:
            self._check_target(chain, r.target)
        ch.rules[pos:pos] = rules
        self.nrules += len(rules)

    def delete_spec(self, chain: str, rules: list[Rule]) -> None:
        ch = self.chain(chain)
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

    def flush(self, chain: str | None) -> None:
        chains = [self.chain(chain)] if chain is not None else list(self.chains.values())
        for ch in chains:
            self.nrules -= len(ch.rules)
            ch.rules.clear()

    def delete_chain(self, name: str | None) -> None:
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
        ch = self.chain(name)
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
        ch = self.chain(chain)
        if not ch.builtin:
            raise Bad(f"only built-in chains have a policy, not {chain!r}")
        if verdict == MASQ and chain != "forward":
            raise Bad(f"MASQ policy is only allowed for the forward chain, not {chain}")
        ch.policy = verdict
        ch.policy_origin = where

    def make_rules(self, chain: str, sp: Spec, where: str) -> list[Rule]:
        """The Rule (two with -b) that ``sp`` stands for in ``chain``; see ``spec.make_rules``."""
        return make_rules(chain, sp, where, self.env.services)

    # .............................................................. forwarders

    def listen(self, tok: str) -> str:
        """The local side of a port forward: "wan" (follows the WAN address) or masqd's WAN address.

        An address the aliases map to the WAN side follows the WAN address too.
        Any other address is refused: masqd would never see a packet for it.
        """
        if tok in WAN_SYMBOLS:
            return "wan"
        addr = parse_host(tok)
        side = self.env.aliases.get(tok)
        if side == "wan":
            return "wan"
        if addr == self.env.wan_ip or (self.env.wan_ip is None and side is None):
            return ip_str(addr)
        if side == "lan" or addr == self.env.lan_ip:
            raise Bad(f"port forward on {tok}, masqd's LAN side: masqd forwards ports that arrive on "
                      "its WAN address (write $WAN or wan)")
        wan = ip_str(self.env.wan_ip) if self.env.wan_ip is not None else "?"
        raise Bad(f"port forward on {tok}, which is not masqd's WAN address ({wan}): it would never "
                  f"receive a packet; write $WAN (or wan), or map the address in firewall.aliases, "
                  f"e.g. \"{tok}\" = \"wan\"")

    def set_timeouts(self, values: list[str]) -> None:
        """``-M -S TCP TCPFIN UDP``: seconds, 0 keeps the current value (as in Linux 2.2)."""
        if len(values) != 3:
            raise Bad("masquerade timeouts take 3 values: TCP TCPFIN UDP (seconds, 0 keeps the current one)")
        got = []
        for v in values:
            if not v.isdigit() or len(v) > 10 or int(v) > MAX_TIMEOUT:
                raise Bad(f"bad timeout {printable(v)}: whole seconds from 0 to {MAX_TIMEOUT}")
            got.append(int(v))
        for name, secs in zip(TIMEOUT_NAMES, got, strict=True):
            if secs:
                self.timeouts[name] = secs

    def make_portfw(self, proto: str, listen: str, port: str, to: str, to_port: str, pref: str | None) -> PortForward:
        lp = port_number(port, TCP if proto == "tcp" else UDP, self.env.services)
        tp = port_number(to_port, TCP if proto == "tcp" else UDP, self.env.services)
        if lp == 0 or tp == 0:
            raise Bad("port 0 cannot be forwarded")
        pr = 10
        if pref is not None:
            if not pref.isdigit() or not 1 <= int(pref[:9]) <= 1_000_000:
                raise Bad(f"bad preference {printable(pref)} (a number from 1)")
            pr = int(pref)
        return PortForward(
            proto="tcp" if proto == "tcp" else "udp", listen=self.listen(listen), port=lp,
            to=ipaddress.IPv4Address(parse_host(to)), to_port=tp, pref=pr,
        )

    @staticmethod
    def split_addr_port(tok: str) -> tuple[str, str]:
        if "/" not in tok:
            raise Bad(f"expected ADDR/PORT, got {printable(tok)}")
        a, p = tok.rsplit("/", 1)
        return a, p

    def remove_portfw(self, fw: PortForward, match_remote: bool) -> None:
        for j, old in enumerate(self.portfw):
            if (old.proto, old.listen, old.port) == (fw.proto, fw.listen, fw.port) and (
                not match_remote or (old.to, old.to_port) == (fw.to, fw.to_port)
            ):
                del self.portfw[j]
                return
        raise Bad(f"no such port forward {fw.proto} {fw.listen}:{fw.port} to delete")

    def set_protofw(self, proto: int, host: int) -> None:
        """``ipfwd``: protocol ``proto`` goes to ``host``; a later line for it replaces an earlier one."""
        self.protofw = [p for p in self.protofw if p.proto != proto]
        self.protofw.append(ProtoForward(proto=proto, to=ipaddress.IPv4Address(host)))

