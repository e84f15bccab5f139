"""Data plane: TUN/TAP devices, Ethernet/ARP for TAP, and the read/write loop around the engine.

``device`` opens and places devices, ``l2`` is the Ethernet host of a TAP
port, ``router`` holds the packet path, ``run`` the process life cycle.

May import: ``masqd.engine`` and the layers below it (``config``, ``firewall``,
``wire``), asyncio, uvloop, pytun, pyroute2 and the standard library; not
``masqd.ops``, the cli or the lab (ops wrap the data plane, not the reverse).
"""
