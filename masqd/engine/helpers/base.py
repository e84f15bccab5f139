"""The narrow interface between the engine core and its protocol helpers.

Each helper also carries its own state as plain records (``masqd.engine.state``):
``export`` / ``record`` make them, ``restore`` / ``forget`` apply them (through the
helper's own bookkeeping, so its bounds hold), ``rearm`` restarts its timers.

Modelled on libalias's module records: a helper declares what it works on
(whole IP protocols such as ESP or GRE, UDP packets between two well-known
ports such as ISAKMP 500<->500, or TCP sessions to a server port such as PPTP
1723) and the core calls it only for those packets. Adding a helper touches no
core file: it is listed in ``masqd.engine.helpers.HELPERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.api import EngineAPI
    from masqd.engine.nat import Session


class Helper:
    name = "helper"
    # IP protocols the helper masquerades itself (e.g. 47 GRE, 50 ESP, 51 AH).
    ip_protocols: tuple[int, ...] = ()
    # UDP packets whose source and destination ports are both this port (ISAKMP 500).
    udp_ports: tuple[int, ...] = ()
    # TCP sessions whose server port is this port get ``tcp_segment`` calls (PPTP 1723).
    tcp_ports: tuple[int, ...] = ()

    def __init__(self, eng: EngineAPI, cfg: Config) -> None:
        self.eng = eng
        self.cfg = cfg

    def enabled(self) -> bool:
        return True

    # --- packets owned by the helper (ip_protocols / udp_ports) ---------------
    def masq_out(self, pkt: bytearray, ihl: int, now: float) -> bool:
        """Masquerade an outbound LAN->WAN packet in place. False: dropped (the helper counted why)."""
        return False

    def demasq_in(self, pkt: bytearray, ihl: int, now: float) -> list[bytearray] | None:
        """An inbound WAN packet to the WAN address. None: not the helper's; else the
        packets (rewritten) to deliver on the LAN; [] when dropped (counted)."""
        return None

    # --- TCP sessions the helper is attached to (tcp_ports) -------------------
    def session_created(self, s: Session, now: float) -> None:
        """A TCP session to one of ``tcp_ports`` was created."""

    def tcp_segment(self, s: Session, pkt: bytearray, ihl: int, outbound: bool, now: float) -> bool:
        """A segment of an attached session, after address/port translation.
        May rewrite the payload in place (fixing the TCP checksum incrementally).
        False: drop it (counted by the helper)."""
        return True

    def session_closed(self, s: Session) -> None:
        """An attached session expired or was flushed."""

    # --- state as records (state file, active/backup sync) ----------------------
    # the record kinds this helper makes and applies (masqd.engine.state.SCHEMAS)
    record_kinds: tuple[str, ...] = ()

    def export(self, now: float) -> list[dict[str, Any]]:
        """Every entry of the helper as a record."""
        return []

    def record(self, entry: Any, now: float) -> dict[str, Any] | None:
        """The record of ``entry`` (announced on the change stream); None: not this helper's."""
        return None

    def restore(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        """Create or update the entry of a checked record with ``left`` seconds to live.
        None when applied, else the reason it was refused (counted by the caller)."""
        return "unknown_kind"

    def forget(self, rec: dict[str, Any], reason: str) -> bool:
        """Remove the entry a record names; True if there was one."""
        return False

    def rearm(self, now: float) -> None:
        """Give every entry a full lifetime from ``now`` (a backup taking over)."""

    # --- what LAN hosts tell masqd (PCP SPI_ANNOUNCE, masqd.engine.pcp) ---------
    def sa_announced(self, lan_ip: int, rem_ip: int, spi_out: int, spi_in: int, withdraw: bool,
                     now: float) -> tuple[str, list[bytearray]] | None:
        """LAN host ``lan_ip`` set up an SA pair with ``rem_ip``: it sends with ``spi_out`` and
        receives with ``spi_in`` (``withdraw``: the pair is gone). None: not this helper's
        business; else a status ("ok"; "taken": the inbound SPI is another host's; "full") and
        inbound packets the helper held for that SPI, rewritten for the LAN host."""
        return None

    # --- housekeeping ----------------------------------------------------------
    def expire(self, now: float) -> None:
        pass

    def entries(self, now: float) -> list[dict[str, Any]]:
        return []

    def row(self, entry: Any, now: float) -> dict[str, Any] | None:
        """One of the helper's own entries (as announced on the change stream) as a row of
        ``entries``; None: not one of the helper's."""
        return None

    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        pass

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg

    def flush(self) -> int:
        return 0

    def size(self) -> int:
        return 0

    def tables(self) -> dict[str, tuple[int, int]]:
        """The helper's own tables: name -> (entries, limit), for the metrics."""
        return {}
