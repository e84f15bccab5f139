"""masqd: a userspace IPv4 masquerading router with IPsec and PPTP VPN masquerade.

The package is in layers, lowest first; a module imports its own layer and the
ones below it, never one above (``tests/unit/test_layers.py`` checks it):

    wire <- firewall <- config <- engine <- dataplane <- ops <- cli

``wire`` packet formats, ``firewall`` the rule language and chains, ``config``
the validated configuration, ``engine`` the sans-IO router, ``dataplane`` the
devices and the event loop, ``ops`` metrics, logs, control socket and reload,
``cli`` the ``masqd`` command. ``lab`` (the namespace lab and the demo) stands
apart: only ``cli`` imports it.

May import: nothing from masqd (every module of the package imports this one
first), so it holds only the version.
"""

__version__ = "0.1.0"
