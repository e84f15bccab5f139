"""masqd: a userspace IPv4 masquerading router with IPsec and PPTP VPN masquerade."""

__version__ = "0.1.0"
