"""One module per tool of the HOWTO's era; ``DIALECTS`` maps a program name to its ``run``.

Each ``run(builder, args, where)`` executes one command line (the words after
the program name) on a ``Builder`` and raises ``Bad`` to refuse it.
"""

from __future__ import annotations

from collections.abc import Callable

from masqd.firewall.builder import Builder
from masqd.firewall.dialects import ipchains, ipfwadm, ipfwd, ipmasqadm, ipportfw

Run = Callable[[Builder, list[str], str], None]

DIALECTS: dict[str, Run] = {
    "ipchains": ipchains.run,
    "ipfwadm": ipfwadm.run,
    "ipmasqadm": ipmasqadm.run,
    "ipportfw": ipportfw.run,
    "ipfwd": ipfwd.run,
}
