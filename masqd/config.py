"""Configuration: one TOML file turned into a validated, immutable ``Config``.

Every error is collected and reported at once, each with the key path (and
the line in the rules text where that applies) and the reason. Nothing here
touches the network; the engine, the data plane and ops read the result.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from masqd.firewall import check_config_rules
from masqd.firewall.builder import DEFAULT_ALIASES
from masqd.firewall.model import PortForward, ProtoForward


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` lists every problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Route(_Frozen):
    """An extra prefix reached through an interface (for example a public DMZ)."""

    prefix: ipaddress.IPv4Network
    via: ipaddress.IPv4Address | None = None


class Interface(_Frozen):
    name: str = ""
    mode: Literal["tun", "tap"] = "tun"
    address: ipaddress.IPv4Interface
    mtu: int = Field(1500, ge=576, le=65535)
    netns: str | None = None
    persistent: bool = False
    # After moving the device to `netns`, enslave it to this bridge there (TAP mode).
    bridge: str | None = None
    offload: bool = True
    mac: str | None = None
    routes: tuple[Route, ...] = ()

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
            raise ValueError("MAC address must look like 02:00:00:00:00:01")
        return v.lower()


class LanInterface(Interface):
    name: str = "masqd-lan"


class WanInterface(Interface):
    name: str = "masqd-wan"
    gateway: ipaddress.IPv4Address | None = None
    # Where the WAN address comes from: "config", "interface:<ifname>" (a kernel interface in
    # masqd's own network namespace, followed over netlink) or "control" (control socket only).
    address_source: str = "config"
    dynaddr_mode: Literal["rewrite", "rewrite-all", "flush"] = "rewrite-all"

    @field_validator("address_source")
    @classmethod
    def _address_source(cls, v: str) -> str:
        if v in ("config", "control"):
            return v
        kind, sep, ifname = v.partition(":")
        if kind != "interface" or not sep:
            raise ValueError('must be "config", "control" or "interface:NAME"')
        if not 1 <= len(ifname) <= 15 or any(c in ifname for c in "/:@ \t\n") or ifname in (".", ".."):
            raise ValueError(f"interface:NAME: {ifname!r} is not a Linux interface name (1-15 characters, "
                             "no '/', ':', '@' or blanks; only masqd's own network namespace)")
        return v

    @property
    def address_interface(self) -> str | None:
        """The kernel interface the WAN address follows (``address_source = "interface:NAME"``), else None."""
        return self.address_source.partition(":")[2] if self.address_source.startswith("interface:") else None


class Timeouts(_Frozen):
    """Seconds. Defaults meet RFC 4787 / 5382 / 5508 / 7857."""

    tcp_established: float = Field(7440.0, gt=0)
    tcp_transitory: float = Field(240.0, gt=0)
    tcp_fin: float = Field(240.0, gt=0)
    tcp_rst: float = Field(240.0, gt=0)
    udp: float = Field(300.0, gt=0)
    icmp: float = Field(60.0, gt=0)
    other: float = Field(300.0, gt=0)


LINUX22_TIMEOUTS = Timeouts(
    tcp_established=900.0, tcp_transitory=120.0, tcp_fin=120.0, tcp_rst=120.0, udp=300.0, icmp=60.0
)


class Masquerade(_Frozen):
    profile: Literal["rfc", "linux-2.2"] = "rfc"
    ports: tuple[int, int] | None = None  # None: from profile
    inbound_filtering: Literal[
        "endpoint-independent", "address-dependent", "address-and-port-dependent"
    ] = "address-dependent"
    port_preservation: bool = True
    hairpinning: bool = True
    max_entries: int = Field(1_048_576, ge=16)
    timeouts: Timeouts | None = None  # None: from profile
    # IP fragments reassembly: bounded memory and time.
    defrag_timeout: float = Field(30.0, gt=0)
    defrag_max_datagrams: int = Field(1024, ge=1)
    defrag_max_bytes: int = Field(4 * 1024 * 1024, ge=65536)
    mss_clamp: bool = True
    # Per-entry packet and byte counters, both directions (like nf_conntrack_acct): shown by
    # masqd table and in destroy events. Off: no counters, no cost.
    accounting: bool = False

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is None:
            return v
        lo, hi = v
        if not (1 <= lo <= hi <= 65535):
            raise ValueError("ports must be [low, high] with 1 <= low <= high <= 65535")
        return v

    @property
    def port_range(self) -> tuple[int, int]:
        if self.ports is not None:
            return self.ports
        return (61000, 65095) if self.profile == "linux-2.2" else (1024, 65535)

    @property
    def effective_timeouts(self) -> Timeouts:
        if self.timeouts is not None:
            return self.timeouts
        return LINUX22_TIMEOUTS if self.profile == "linux-2.2" else Timeouts()


class Limits(_Frozen):
    """Per-LAN-host limits and the bounds of hostile traffic (docs/limits.md has the arithmetic).

    ``host_max_entries``: sessions of one LAN host, all protocols together (the
    cost of an entry does not depend on its protocol); unset: ``max_entries`` / 16.
    ``host_max_ports``: WAN ports (ICMP identifiers) one LAN host holds per
    protocol, in use or in quarantine; unset: a quarter of the port pool.
    ``host_mapping_rate`` / ``host_mapping_burst``: new mappings per second per
    host (token bucket). ``port_quarantine``: seconds a released port is kept
    from other hosts (RFC 6888 REQ-8). ``half_open_per_server``: inbound TCP
    sessions not yet answered per LAN endpoint (a forwarded server). 0 turns a
    limit off. ``host_slowpath_rate``: while a host is over its mapping rate, its
    packets that would open a flow reach the engine's full path at most this
    often per second (unset: twice ``host_mapping_rate``; 0: unbounded), the rest
    are dropped before it (docs/limits.md, "The CPU").
    ``top_offenders``: hosts listed by ``masqd stats`` and the metrics;
    ``log_interval``: seconds between two ``host_limit`` log events of one host.
    """

    host_max_entries: int | None = Field(None, ge=0)
    host_max_ports: int | None = Field(None, ge=0)
    host_mapping_rate: float = Field(1000.0, ge=0)
    host_mapping_burst: int = Field(4000, ge=1)
    port_quarantine: float = Field(120.0, ge=0, le=3600)
    half_open_per_server: int = Field(1024, ge=0)
    host_slowpath_rate: float | None = Field(None, ge=0)
    top_offenders: int = Field(10, ge=1, le=100)
    log_interval: float = Field(10.0, gt=0)

    def effective(self, max_entries: int, pool_size: int) -> dict[str, float]:
        """The numbers in force: unset ones derived from the table and pool sizes."""
        return {
            "max_entries": self.host_max_entries if self.host_max_entries is not None else max(1, max_entries // 16),
            "max_ports": self.host_max_ports if self.host_max_ports is not None else max(1, pool_size // 4),
            "rate": self.host_mapping_rate,
            "burst": self.host_mapping_burst,
            "quarantine": self.port_quarantine,
            "half_open": self.half_open_per_server,
            "punt_rate": (self.host_slowpath_rate if self.host_slowpath_rate is not None
                          else 2 * self.host_mapping_rate),
        }


def _default_aliases() -> dict[str, Literal["lan", "wan"]]:
    """The firewall's default interface aliases (``ppp+`` and friends -> wan)."""
    return {k: "lan" if v == "lan" else "wan" for k, v in DEFAULT_ALIASES.items()}


class FirewallRule(_Frozen):
    """One structured rule (``[[firewall.rule]]``), the TOML twin of an ``ipchains -A`` line.

    Strings use the ipchains syntax; a leading ``!`` negates (``proto = "!tcp"``).
    A chain that is not built in is created on first use.
    """

    chain: str
    target: str = ""  # ACCEPT DENY REJECT MASQ RETURN, a user chain, or "" (count only)
    proto: str = "all"  # tcp udp icmp all, or a number such as 47 or 50
    src: str = "0.0.0.0/0"
    sport: str = ""  # "500", "1024:65535", or an ICMP type name
    dst: str = "0.0.0.0/0"
    dport: str = ""
    iface: str = ""  # lan, wan, or a name from aliases
    syn: bool | None = None  # True: -y; False: ! -y
    fragment: bool | None = None  # True: -f; False: ! -f
    log: bool = False
    bidirectional: bool = False
    position: int | None = Field(None, ge=1)  # insert at this rule number instead of appending


class Firewall(_Frozen):
    input_policy: Literal["ACCEPT", "DENY", "REJECT"] = "ACCEPT"
    forward_policy: Literal["ACCEPT", "DENY", "REJECT", "MASQ"] = "MASQ"
    output_policy: Literal["ACCEPT", "DENY", "REJECT"] = "ACCEPT"
    # ipchains / ipfwadm / ipmasqadm / ipportfw / ipfwd lines, as in the HOWTO.
    rules: str = ""
    rules_file: str | None = None
    # Interface names used in rule lines -> "lan" / "wan".
    aliases: dict[str, Literal["lan", "wan"]] = Field(default_factory=_default_aliases)
    log_rate: float = Field(10.0, gt=0)  # -l log events per second, burst the same
    # Structured rules, applied after rules_file and rules.
    rule: tuple[FirewallRule, ...] = ()


class IPsec(_Frozen):
    enabled: bool = True
    pending_lifetime: float = Field(120.0, gt=0)  # ESP INIT
    pending_retries: int = Field(5, ge=0)
    squelch_time: float = Field(30.0, ge=0)
    table_lifetime: float = Field(1800.0, gt=0)
    guess_max_hosts: int = Field(5, ge=1)
    guess_min_left: float = Field(300.0, ge=0)
    parallel_sessions: bool = False
    max_spis_per_remote: int = Field(64, ge=1)
    max_entries: int = Field(16384, ge=1)  # ESP SPI entries and ISAKMP entries together


class PPTP(_Frozen):
    enabled: bool = True
    port: int = Field(1723, ge=1, le=65535)
    call_setup_timeout: float = Field(120.0, gt=0)
    call_timeout: float = Field(900.0, gt=0)
    call_clear_timeout: float = Field(30.0, gt=0)
    max_calls_per_server: int = Field(4096, ge=1)
    max_entries: int = Field(16384, ge=1)  # PPTP calls and plain GRE entries together


class PCP(_Frozen):
    """The PCP (RFC 6887) and NAT-PMP (RFC 6886) server on the LAN address, UDP port 5351.

    Off by default (RFC 6887 section 18: a NAT that lets hosts open inbound ports
    is a policy decision). Requests are taken from the LAN side only, for the
    sender's own address; ``third_party`` lists the LAN hosts allowed to ask for
    another LAN host (PCP THIRD_PARTY). Lifetimes are clamped to
    [``min_lifetime``, ``max_lifetime``] seconds; external ports come from
    ``ports`` (a suggested port inside the range is given when free);
    ``max_mappings_per_host`` and ``requests_per_second`` (with a burst of
    ``request_burst``) bound each host. ``spi_announce``: IPsec hosts may announce
    their ESP SPI pairs (masqd's opcode, docs/pcp.md); inbound ESP with an SPI
    nobody has paired yet waits up to ``spi_hold`` seconds (``spi_hold_packets``
    packets at most) for the announcement, while an announcing host uses the
    remote gateway.
    """

    enabled: bool = False
    min_lifetime: int = Field(120, ge=1)
    max_lifetime: int = Field(86400, ge=1)
    ports: tuple[int, int] = (1024, 65535)
    max_mappings_per_host: int = Field(64, ge=0)
    requests_per_second: float = Field(10.0, gt=0)
    request_burst: int = Field(20, ge=1)
    third_party: tuple[ipaddress.IPv4Address, ...] = ()
    spi_announce: bool = True
    spi_hold: float = Field(2.0, ge=0, le=30)
    spi_hold_packets: int = Field(256, ge=0, le=65536)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not (1 <= lo <= hi <= 65535):
            raise ValueError("ports must be [low, high] with 1 <= low <= high <= 65535")
        return v

    @model_validator(mode="after")
    def _lifetimes(self) -> PCP:
        if self.min_lifetime > self.max_lifetime:
            raise ValueError("pcp.min_lifetime is above pcp.max_lifetime")
        return self


class Forwarding(_Frozen):
    """Forwards written as TOML; the types are the firewall's (``masqd.firewall.model``)."""

    portfw: tuple[PortForward, ...] = ()
    protofw: tuple[ProtoForward, ...] = ()


class Metrics(_Frozen):
    enabled: bool = True
    listen: str = "127.0.0.1:9598"
    path: str = "/metrics"


class Logging(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    rate_per_event: float = Field(5.0, gt=0)


class Control(_Frozen):
    socket: str = "/run/masqd/masqd.sock"


class State(_Frozen):
    """The state file: the masquerade table (every protocol and helper), the dynamic WAN address
    and the counters, kept across a restart. Written at stop (SIGTERM/SIGINT), on ``masqd
    save``, and every ``interval`` seconds when that is not 0; read back by ``masqd run``.
    Not the JSON snapshot of ``--state-file`` (SIGUSR1), which is for scripts."""

    enabled: bool = True
    file: str = "/var/lib/masqd/state"
    interval: float = Field(0.0, ge=0)

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: float) -> float:
        if v and v < 1.0:
            raise ValueError("interval must be 0 (off) or at least 1 second")
        return v


class HA(_Frozen):
    """Active/backup pair (masqd.ops.ha): keepalived decides who is active and tells masqd through
    the control socket (``masqd role``); the active sends every table change to the peer over a
    dedicated link (UDP, HMAC-SHA256 with the key in ``key_file``). TAP mode only."""

    enabled: bool = False
    listen: str = "0.0.0.0:7017"  # the sync socket (in masqd's own network namespace)
    peer: str = ""  # the peer's sync address, HOST:PORT; messages from anywhere else are dropped
    key_file: str = "/etc/masqd/ha.key"
    # a TUN device kept open (and up) while masqd runs and is ready to take over; keepalived
    # tracks it (track_interface): it vanishes when masqd dies. "" for none.
    alive_device: str = "masqd-alive"
    batch_interval: float = Field(0.01, ge=0.001, le=1.0)  # seconds between sync batches
    queue_max: int = Field(65536, ge=16)  # changes waiting to be sent; beyond: a full resync
    sync_wait: float = Field(2.0, ge=0)  # at start, wait this long for an active peer's table

    @field_validator("listen", "peer")
    @classmethod
    def _hostport(cls, v: str) -> str:
        if not v:
            return v
        host, sep, port = v.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
            ok = bool(sep) and 1 <= int(port) <= 65535
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{v!r}: must be IPV4:PORT")
        return v


class Capture(_Frozen):
    lan: str | None = None  # pcap file path
    wan: str | None = None


class DataplaneSettings(_Frozen):
    """Where the work of the data plane runs.

    ``rps``: the kernel work that follows each write to masqd's devices (the
    bridge, the next hop's stack when it is a local namespace) runs by default
    in masqd's own thread. "auto" pins masqd to the first CPU it may use and
    steers that work (receive packet steering of its devices) to the others;
    a hex mask names the CPUs for it (masqd then runs on the allowed CPUs
    outside the mask); "off" leaves both to the kernel's defaults.

    ``napi``: "threaded" opens both devices with IFF_NAPI and turns on threaded
    NAPI for them: a write only queues the packet, and a kernel thread per
    device ("napi/<dev>-<id>") runs the receive path that follows, in batches,
    on whichever CPU the scheduler gives it; "off" runs it in masqd's thread
    within the write; "adaptive" (the default) opens the devices the same way
    and turns the threads on while the packet rate is high (20 000 packets/s
    over 0.1 s), off again after a second below 5 000 (the thread's wake-up
    adds latency at low rates). Where sysfs is read-only (a container), the
    devices work as with "off", with a warning. Both need the devices
    recreated: a change is refused by a reload.

    ``keep_warm``: seconds between runs of a synthetic exchange through a
    shadow engine while traffic is recent, so that sparse packets find the
    packet path in the CPU caches (lower latency at low rates, for some CPU);
    0 (the default) is off. See masqd.dataplane.warm.

    ``fastpath``: "native" (the default) lets a flow cache written in C forward
    the packets of established TCP/UDP flows once the engine has forwarded one
    of them (the engine still decides everything; the cache repeats its rewrite
    and is emptied whenever a decision could change); "python" sends every
    packet through the Python engine. A reload applies a change. See
    masqd/dataplane/_fastpath.c.

    ``coalesce``: seconds. Under load (a wake-up that finds packets queued back
    to back), masqd sleeps this long and drains both devices again, in rounds,
    as long as each round finds packets (interrupt moderation, as a NIC's
    ``rx-usecs``): at a steady rate it wakes once per period instead of once per
    burst, for up to that much latency under load and none at low rates (nor
    for bulk TCP: a super-packet ends the rounds). Default 0.0005; 0 is off; a
    reload applies a change.

    ``queues``: the devices are opened with this many queues (IFF_MULTI_QUEUE),
    and with the native fast path one reader thread serves each queue of both
    devices, forwarding the flows it knows without the Python interpreter (the
    kernel keeps a flow on one queue, so the work spreads over the CPUs flow by
    flow). 0 (the default) is one per CPU masqd may run on, at most 8. Needs the
    devices recreated: a change is refused by a reload.
    """

    rps: str = "off"
    napi: Literal["off", "threaded", "adaptive"] = "adaptive"
    keep_warm: float = 0.0
    fastpath: Literal["native", "python"] = "native"
    coalesce: float = 0.0005
    queues: int = Field(0, ge=0, le=16)

    @field_validator("coalesce")
    @classmethod
    def _coalesce(cls, v: float) -> float:
        if v != 0 and not 0.00002 <= v <= 0.001:
            raise ValueError("coalesce must be 0 (off) or between 0.00002 and 0.001 seconds (20 µs to 1 ms)")
        return v

    @field_validator("keep_warm")
    @classmethod
    def _keep_warm(cls, v: float) -> float:
        if v != 0 and not 0.001 <= v <= 0.1:
            raise ValueError("keep_warm must be 0 (off) or between 0.001 and 0.1 seconds "
                             "(the event loop's timers count whole milliseconds)")
        return v

    @field_validator("rps")
    @classmethod
    def _rps(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("off", "auto"):
            return v
        try:
            mask = int(v, 16)
        except ValueError:
            raise ValueError('rps must be "off", "auto" or a hex CPU mask such as "2"') from None
        if mask <= 0:
            raise ValueError("rps mask must name at least one CPU")
        return v


class Config(_Frozen):
    lan: LanInterface
    wan: WanInterface
    masquerade: Masquerade = Masquerade()
    limits: Limits = Limits()
    firewall: Firewall = Firewall()
    ipsec: IPsec = IPsec()
    pptp: PPTP = PPTP()
    pcp: PCP = PCP()
    forwarding: Forwarding = Forwarding()
    metrics: Metrics = Metrics()
    logging: Logging = Logging()
    control: Control = Control()
    capture: Capture = Capture()
    state: State = State()
    ha: HA = HA()
    dataplane: DataplaneSettings = DataplaneSettings()
    expire_interval: float = Field(1.0, gt=0)
    source: str = "<string>"

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.lan.address.network.overlaps(self.wan.address.network):
            raise ValueError("lan.address and wan.address networks overlap")
        if self.wan.gateway is not None and self.wan.gateway not in self.wan.address.network:
            raise ValueError("wan.gateway is not inside the wan.address network")
        if self.ha.enabled and (self.lan.mode != "tap" or self.wan.mode != "tap"):
            raise ValueError("ha.enabled needs lan.mode and wan.mode \"tap\" (the pair shares the segments)")
        if self.ha.enabled and not self.ha.peer:
            raise ValueError("ha.enabled needs ha.peer (the peer's sync address)")
        return self


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        out.append(f"{loc}: {msg}")
    return out


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    try:
        cfg = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from None
    # Rules are parsed here so that a config with a bad rule line is refused whole.
    rules = check_config_rules(cfg)
    if rules.errors:
        raise ConfigError(source, rules.errors)
    if rules.timeouts:  # ipchains -M -S / ipfwadm -M -s lines set masquerade timeouts
        m = cfg.masquerade
        timeouts = m.effective_timeouts.model_copy(update=rules.timeouts)
        cfg = cfg.model_copy(update={"masquerade": m.model_copy(update={"timeouts": timeouts})})
    return cfg


def loads(text: str, source: str = "<string>") -> Config:
    """Build a Config from TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"TOML syntax: {exc}"]) from None
    return from_dict(data, source)


def load(path: str | Path) -> Config:
    """Read and validate a TOML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), ["not UTF-8 text"]) from None
    return loads(text, str(p))
