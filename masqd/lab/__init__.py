"""Network-namespace lab for the demo, the integration tests, the benchmark and interop.

``Lab(prefix, mode)`` builds the HOWTO's networks (see
:mod:`masqd.lab.topology`); ``MasqdProcess`` runs masqd inside it.

May import: the standard library, pyroute2 and itself; nothing else from masqd
(it runs masqd as a process). In the product only ``masqd.cli`` imports it.
"""

from masqd.lab.topology import (
    FW_LAN,
    FW_WAN,
    ISP_REM,
    ISP_WAN,
    KFW_LAN,
    KFW_WAN,
    LAN2,
    LAN3,
    REM2,
    REM3,
    SRV1,
    Lab,
    LabError,
    MasqdProcess,
    stop_process,
)

__all__ = [
    "FW_LAN", "FW_WAN", "ISP_REM", "ISP_WAN", "KFW_LAN", "KFW_WAN", "LAN2", "LAN3", "REM2", "REM3",
    "SRV1", "Lab", "LabError", "MasqdProcess", "stop_process",
]
