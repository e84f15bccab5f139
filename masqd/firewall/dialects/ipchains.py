"""The ``ipchains`` dialect (Linux 2.2): chains, policies and rules.

Supported: -A -I -D -R -F -X -N -P with -p -s -d (ports after the address or
with --sport/--dport) --icmp-type -i -j -y -f -l -b, ``!`` before a value,
and the long option names. Listing, zeroing and checking commands (-L -Z -C)
belong to a running firewall, not to a rules file, and are refused.
"""

from __future__ import annotations

from masqd.firewall.builder import Builder
from masqd.firewall.lexer import Bad, is_option, not_a_mask, printable, suggest
from masqd.firewall.model import VERDICT_BY_NAME
from masqd.firewall.spec import Spec
from masqd.firewall.values import parse_addr, parse_proto, parse_tos

LONG_OPTIONS = {
    "--append": "-A", "--insert": "-I", "--delete": "-D", "--replace": "-R", "--flush": "-F",
    "--delete-chain": "-X", "--new-chain": "-N", "--policy": "-P", "--protocol": "-p",
    "--proto": "-p", "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d",
    "--source-port": "--sport", "--destination-port": "--dport", "--jump": "-j",
    "--interface": "-i", "--syn": "-y", "--fragment": "-f", "--log": "-l",
    "--bidirectional": "-b", "--verbose": "-v", "--numeric": "-n", "--exact": "-x",
    "--list": "-L", "--zero": "-Z", "--check": "-C", "--masquerading": "-M", "--set": "-S",
    "--help": "-h", "--mark": "-m", "--TOS": "-t", "--output": "-o",
}
_VALID = {
    "-A", "-I", "-D", "-R", "-F", "-X", "-N", "-P", "-p", "-s", "-d", "--sport", "--dport",
    "--icmp-type", "-j", "-i", "-y", "-f", "-l", "-b", "-v", "-n", "-x", "-t", "-M", "-S",
}


def _masquerade(b: Builder, words: list[str]) -> None:
    """``ipchains -M -S TCP TCPFIN UDP`` (``-M`` may be left out, as ipchains allowed)."""
    rest = words[1:] if words[:1] == ["-M"] else words
    if rest[:1] == ["-L"]:
        raise Bad("ipchains -M -L is not supported in a rules file")
    if rest[:1] != ["-S"]:
        raise Bad("expected: ipchains -M -S TCP TCPFIN UDP")
    b.set_timeouts(rest[1:])


def run(b: Builder, args: list[str], where: str) -> None:
    """Execute one ``ipchains`` command line (without the program name) on ``b``."""
    words = [LONG_OPTIONS.get(a, a) for a in args]
    if words[:1] == ["-M"] or "-S" in words:
        _masquerade(b, words)
        return
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
        if i >= n or is_option(args[i]):
            raise Bad(f"option {opt} needs a value")
        i += 1
        return ng, args[i - 1]

    def opt_port() -> tuple[bool, str] | None:
        nonlocal i
        if i < n and args[i] == "!" and i + 1 < n and not is_option(args[i + 1]):
            i += 2
            return True, not_a_mask(args[i - 1])
        if i < n and args[i] != "!" and not is_option(args[i]):
            i += 1
            return False, not_a_mask(args[i - 1])
        return None

    def positional() -> str | None:
        nonlocal i
        if i < n and not is_option(args[i]) and args[i] != "!":
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
        o = LONG_OPTIONS.get(a, a)
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
        if o in ("-m", "-o"):
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
        elif o == "-t":
            if neg:
                raise Bad("'!' cannot negate -t")
            if i + 1 >= n or is_option(args[i]) or is_option(args[i + 1]) or "!" in args[i : i + 2]:
                raise Bad("-t needs two hex bytes: ANDMASK XORMASK")
            tos_and, tos_xor, multi = parse_tos(args[i], args[i + 1])
            i += 2
            sp.tos = (tos_and, tos_xor)
            if multi:
                b.warnings.append(f"{where}: TOS masks {args[i - 2]} {args[i - 1]} may set more than one "
                                  f"TOS bit for packets with TOS {', '.join(multi)}")
        elif o == "--icmp-type":
            sp.icmp_neg, sp.icmp = value(a)
        elif o == "-i":
            sp.iface_neg, tok = value(a)
            sp.ifaces, sp.iface_name = b.iface(tok), tok
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
        elif is_option(a):
            raise Bad(f"unknown option {printable(a)}{suggest(a, _VALID)}")
        else:
            raise Bad(f"unexpected argument {printable(a)}")
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
            b.flush(chain)
        elif cmd == "-X":
            b.delete_chain(chain)
        elif cmd == "-N":
            assert chain is not None
            b.new_chain(chain)
        elif cmd == "-P":
            assert chain is not None and policy is not None
            if policy not in VERDICT_BY_NAME:
                hint = " (targets are upper case)" if policy.upper() in VERDICT_BY_NAME else ""
                raise Bad(f"bad policy {printable(policy)}{hint}: ACCEPT, DENY, REJECT or MASQ")
            b.set_policy(chain, VERDICT_BY_NAME[policy], where)
        else:
            assert chain is not None and num is not None
            ch = b.chain(chain)
            if not 1 <= num <= len(ch.rules):
                raise Bad(f"chain {chain} has no rule {num}")
            del ch.rules[num - 1]
            b.nrules -= 1
        return
    assert chain is not None
    ch = b.chain(chain)
    rules = b.make_rules(chain, sp, where)
    if cmd == "-A":
        b.insert(chain, len(ch.rules), rules)
    elif cmd == "-I":
        pos = 1 if num is None else num
        if not 1 <= pos <= len(ch.rules) + 1:
            raise Bad(f"cannot insert at {pos}: chain {chain} has {len(ch.rules)} rules")
        b.insert(chain, pos - 1, rules)
    elif cmd == "-R":
        assert num is not None
        if not 1 <= num <= len(ch.rules):
            raise Bad(f"chain {chain} has no rule {num}")
        if len(rules) != 1:
            raise Bad("-R cannot be used with -b")
        old = ch.rules[num - 1]
        del ch.rules[num - 1]
        b.nrules -= 1
        try:
            b.insert(chain, num - 1, rules)
        except Bad:
            ch.rules.insert(num - 1, old)
            b.nrules += 1
            raise
    else:  # -D by specification
        b.delete_spec(chain, rules)

# .............................................................. ipfwadm
