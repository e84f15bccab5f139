"""Data plane: TUN/TAP devices, Ethernet/ARP for TAP, and the read/write loop around the engine.

``device`` opens and places devices, ``l2`` is the Ethernet host of a TAP
port, ``port`` the read/write path of a device, ``tuning`` the device and
process tuning (rps, offloads, adaptive NAPI, coalescing), ``native`` the glue
of the C flow cache (``_fastpath``), ``warm`` the keep-warm shadow, and
``router`` the ``Dataplane``: life cycle, packet path, timers and control.
(The process life cycle of ``masqd run`` is ``masqd/daemon.py``.)

May import: ``masqd.engine`` and the layers below it (``config``, ``firewall``,
``wire``), asyncio, uvloop, pytun, pyroute2 and the standard library; not
``masqd.ops``, the cli or the lab (ops wrap the data plane, not the reverse).
"""
