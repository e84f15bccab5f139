"""The interop harness: real VPN peers (User-Mode Linux guests) around masqd in the namespace lab.

It builds and plays scenarios; it does not judge them (the checks and the
scenario catalog live beside the tests, in ``tests/interop``). Its parts:
``images`` (the cached guest root trees), ``uml`` (one guest process),
``peers`` (what runs in a guest), ``router`` (masqd, or the kernel as a
reference, between the segments), ``capture`` (tcpdump on a segment),
``process`` (children bound to the harness), ``scenario`` (play a scenario in a
fresh lab), ``dynaddr`` (the WAN-address-change run). The lab itself is
:mod:`masqd.lab`; the harness imports ``masqd`` (the lab, the control socket
client) and nothing from the tests.
"""
