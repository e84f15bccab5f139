"""Child processes bound to the harness: they get a signal when it dies.

Every process the harness starts (guests, captures, masqd, helper tools)
runs in a session of its own, is stopped by its PID with
``masqd.lab.stop_process(proc, group=True)``, and - through
:func:`die_with_parent` - does not outlive a harness killed outright.
"""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen ``preexec_fn``: the child gets ``sig`` when the harness process dies,
    so a killed test run does not leave guests, captures or masqd running."""

    def set_pdeathsig() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_pdeathsig
