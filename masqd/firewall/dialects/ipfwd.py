"""The ``ipfwd`` dialect: ``ipfwd --masq HOST PROTO`` forwards a whole IP protocol (GRE, ESP) to a LAN host."""

from __future__ import annotations

from masqd.firewall.builder import Builder
from masqd.firewall.lexer import Bad
from masqd.firewall.values import TCP, UDP, parse_host, parse_proto


def run(b: Builder, args: list[str], where: str) -> None:
    """Execute one ``ipfwd`` command line (without the program name) on ``b``."""
    if len(args) != 3 or args[0] != "--masq":
        raise Bad("expected: ipfwd --masq HOST PROTO")
    host = parse_host(args[1])
    proto = parse_proto(args[2])
    if proto in (0, TCP, UDP):
        raise Bad(f"ipfwd forwards a whole IP protocol such as 47 or 50, not {args[2]} (use ipportfw for tcp/udp)")
    b.set_protofw(proto, host)
