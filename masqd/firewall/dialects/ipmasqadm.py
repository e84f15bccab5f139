"""The ``ipmasqadm`` dialect (Linux 2.2): its ``portfw`` module, -a/-d/-f with -P -L ADDR PORT -R ADDR PORT [-p PREF]."""

from __future__ import annotations

from masqd.firewall.builder import Builder
from masqd.firewall.lexer import Bad, is_option, printable


def run(b: Builder, args: list[str], where: str) -> None:
    """Execute one ``ipmasqadm`` command line (without the program name) on ``b``."""
    if not args or args[0] != "portfw":
        what = printable(args[0]) if args else "nothing"
        raise Bad(f"ipmasqadm: only the portfw module is supported, got {what}")
    _portfw(b, args[1:])


def _portfw(b: Builder, args: list[str]) -> None:
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
            if i >= n or is_option(args[i]):
                raise Bad(f"option {a} needs a value")
            if a == "-P":
                proto = args[i].lower()
                if proto not in ("tcp", "udp"):
                    raise Bad(f"portfw forwards tcp or udp, not {printable(args[i])}")
            else:
                pref = args[i]
            i += 1
        elif a in ("-L", "-R"):
            if i + 1 >= n or is_option(args[i]) or is_option(args[i + 1]):
                raise Bad(f"option {a} needs an address and a port")
            pair = (args[i], args[i + 1])
            i += 2
            if a == "-L":
                local = pair
            else:
                remote = pair
        elif is_option(a):
            raise Bad(f"unknown ipmasqadm portfw option {printable(a)}")
        else:
            raise Bad(f"unexpected argument {printable(a)}")
    if cmd is None:
        raise Bad("ipmasqadm portfw needs -a, -d or -f")
    if cmd == "-f":
        if proto or local or remote or pref:
            raise Bad("-f takes no other options")
        b.portfw.clear()
        return
    if proto is None:
        raise Bad("ipmasqadm portfw needs -P tcp or -P udp")
    if local is None:
        raise Bad("ipmasqadm portfw needs -L ADDR PORT")
    if cmd == "-a":
        if remote is None:
            raise Bad("ipmasqadm portfw -a needs -R ADDR PORT")
        b.portfw.append(b.make_portfw(proto, local[0], local[1], remote[0], remote[1], pref))
        return
    r = remote or ("0.0.0.1", "1")
    fw = b.make_portfw(proto, local[0], local[1], r[0], r[1], None)
    b.remove_portfw(fw, match_remote=remote is not None)
