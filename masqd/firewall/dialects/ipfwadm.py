"""The ``ipfwadm`` dialect (Linux 2.0): -I/-O/-F categories mapped onto the input, output and forward chains.

Supported: -a -i -d -f -p with -P -S -D (up to 10 ports per address) -W -V -b
-m -o -y -k -t, and ``-M -s TCP TCPFIN UDP`` (masquerade timeouts). A policy
word may be abbreviated (``acc``, ``m``) as ipfwadm allowed. The TOS masks of
-t get the checks ipchains made (Linux 2.0 quietly corrected bad masks instead).
"""

from __future__ import annotations

from masqd.firewall.builder import Builder
from masqd.firewall.lexer import Bad, is_option, not_a_mask, printable, suggest
from masqd.firewall.model import PROTO_BY_NAME, VERDICT_BY_NAME
from masqd.firewall.spec import Spec
from masqd.firewall.values import parse_addr, parse_tos

_VALID = {
    "-I", "-O", "-F", "-a", "-i", "-d", "-f", "-p", "-P", "-S", "-D", "-V", "-W", "-b", "-m", "-o",
    "-y", "-e", "-n", "-v", "-x", "-k", "-t", "-M", "-s",
}
_POLICIES = ("accept", "deny", "reject", "masquerade")


def _policy(tok: str) -> str:
    low = tok.lower()
    hits = [p for p in _POLICIES if low and p.startswith(low)]
    if len(hits) != 1:
        raise Bad(f"bad policy {printable(tok)}: accept, deny, reject or masquerade")
    return {"accept": "ACCEPT", "deny": "DENY", "reject": "REJECT", "masquerade": "MASQ"}[hits[0]]


def _masquerade(b: Builder, rest: list[str]) -> None:
    """``ipfwadm -M -s TCP TCPFIN UDP``: masquerade timeouts, as ``ipchains -M -S``."""
    if rest[:1] == ["-l"]:
        raise Bad("ipfwadm -M -l is not supported in a rules file")
    if rest[:1] != ["-s"]:
        raise Bad("expected: ipfwadm -M -s TCP TCPFIN UDP")
    b.set_timeouts(rest[1:])


def run(b: Builder, args: list[str], where: str) -> None:
    """Execute one ``ipfwadm`` command line (without the program name) on ``b``."""
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
        if i >= n or is_option(args[i]):
            raise Bad(f"option {opt} needs a value")
        i += 1
        return args[i - 1]

    def ports() -> str | None:
        nonlocal i
        got = []
        while i < n and not is_option(args[i]):
            got.append(not_a_mask(args[i]))
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
            _masquerade(b, [w for w in args if w not in ("-M", "-e", "-n", "-v", "-x")])
            return
        if a in ("-l", "-z", "-c", "-h"):
            raise Bad(f"ipfwadm {a} is not supported in a rules file")
        if a in ("-a", "-i", "-d", "-f", "-p"):
            if cmd is not None:
                raise Bad(f"only one command per line ({cmd} and {a})")
            cmd = a
            if a != "-f":
                policy = _policy(value(a))
            continue
        if a in seen and a not in ("-e", "-n", "-v", "-x"):
            raise Bad(f"option {a} given twice")
        seen.add(a)
        if a == "-P":
            tok = value(a)
            if tok.lower() not in ("tcp", "udp", "icmp", "all"):
                raise Bad(f"ipfwadm -P accepts tcp, udp, icmp or all, not {printable(tok)} (use ipchains -p)")
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
            w_sides = b.iface(w_name)
        elif a == "-V":
            v_name = value(a)
            v_sides = b.iface_by_addr(v_name)
        elif a == "-b":
            sp.bidir = True
        elif a == "-m":
            masq = True
        elif a == "-o":
            sp.log = True
        elif a == "-y":
            sp.syn = 1
        elif a == "-k":
            sp.ack = 1
        elif a == "-r":
            raise Bad("ipfwadm -r (redirect) is not supported")
        elif a == "-t":
            if i + 1 >= n or is_option(args[i]) or is_option(args[i + 1]):
                raise Bad("-t needs two hex bytes: ANDMASK XORMASK")
            tos_and, tos_xor, multi = parse_tos(args[i], args[i + 1])
            i += 2
            sp.tos = (tos_and, tos_xor)
            if multi:
                b.warnings.append(f"{where}: TOS masks {args[i - 2]} {args[i - 1]} may set more than one "
                                  f"TOS bit for packets with TOS {', '.join(multi)}")
        elif a in ("-e", "-n", "-v", "-x"):
            pass
        elif is_option(a):
            raise Bad(f"unknown option {printable(a)}{suggest(a, _VALID)}")
        else:
            raise Bad(f"unexpected argument {printable(a)}")
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
            b.flush(cat)
        else:
            assert policy is not None
            b.set_policy(cat, VERDICT_BY_NAME[policy], where)
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
    rules = b.make_rules(cat, sp, where)
    if cmd == "-a":
        b.insert(cat, len(b.chains[cat].rules), rules)
    elif cmd == "-i":
        b.insert(cat, 0, rules)
    else:
        b.delete_spec(cat, rules)
