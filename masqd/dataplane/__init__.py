"""Data plane: TUN/TAP devices, Ethernet/ARP for TAP, and the read/write loop around the engine.

``device`` opens and places devices, ``l2`` is the Ethernet host of a TAP
port, ``router`` holds the packet path, ``run`` the process life cycle.
"""
