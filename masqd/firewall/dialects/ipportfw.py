"""The ``ipportfw`` dialect (Linux 2.0 port forwarding): -C, -A and -D with -t/-u ADDR/PORT -R ADDR/PORT [-p PREF]."""

from __future__ import annotations

from masqd.firewall.builder import Builder
from masqd.firewall.lexer import Bad, is_option, printable


def run(b: Builder, args: list[str], where: str) -> None:
    """Execute one ``ipportfw`` command line (without the program name) on ``b``."""
    if args == ["-C"]:
        b.portfw.clear()
        return
    if not args:
        raise Bad("ipportfw needs -C, -A or -D")
    cmd = args[0]
    if cmd in ("-L", "-l"):
        raise Bad("ipportfw -L is not supported in a rules file")
    if cmd not in ("-A", "-D"):
        raise Bad(f"unknown ipportfw command {printable(cmd)} (expected -C, -A or -D)")
    proto = local = remote = pref = None
    i, n = 1, len(args)
    while i < n:
        a = args[i]
        if a in ("-t", "-u", "-R", "-p") and (i + 1 >= n or is_option(args[i + 1])):
            raise Bad(f"option {a} needs a value")
        if a in ("-t", "-u"):
            if proto is not None:
                raise Bad("give one of -t or -u")
            proto, local = ("tcp" if a == "-t" else "udp"), args[i + 1]
        elif a == "-R":
            remote = args[i + 1]
        elif a == "-p":
            pref = args[i + 1]
        elif is_option(a):
            raise Bad(f"unknown ipportfw option {printable(a)}")
        else:
            raise Bad(f"unexpected argument {printable(a)}")
        i += 2
    if proto is None or local is None:
        raise Bad("ipportfw needs -t ADDR/PORT or -u ADDR/PORT")
    if remote is None:
        raise Bad("ipportfw needs -R ADDR/PORT")
    la, lp = b.split_addr_port(local)
    ra, rp = b.split_addr_port(remote)
    fw = b.make_portfw(proto, la, lp, ra, rp, pref)
    if cmd == "-A":
        b.portfw.append(fw)
    else:
        b.remove_portfw(fw, match_remote=True)
