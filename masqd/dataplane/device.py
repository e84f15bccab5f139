"""TUN/TAP devices: open one for an interface section, place it, hand back a non-blocking fd.

Placement (config ``netns`` / ``bridge``) is done with pyroute2's synchronous
API before the event loop starts (its asyncio API does not run under uvloop).

Design decision: the device is *created inside* its target namespace (we
enter the namespace with setns(2) for the open/TUNSETIFF, then return) rather
than created here and moved. The fd works the same either way, and this also
lets masqd attach to a persistent device that already exists there (the lab
pre-creates the TUN devices of its edge namespaces, with their routes, so a
masqd restart keeps the kernel side intact). The device never appears in
masqd's own namespace, so its name cannot collide there.

Offloads (config ``offload``, on by default): the device is opened with
IFF_VNET_HDR, so every packet read or written carries a 10-byte virtio-net
header (masqd.wire.vnet). The TUNSETOFFLOAD flags are negotiated by the data
plane for both devices together (:func:`set_offload`): a super-packet read on
one side must be writable on the other.

Threaded NAPI (config ``dataplane.napi``): the device is opened with IFF_NAPI
and its sysfs ``threaded`` is set, so a write only queues the packet and a
kernel thread runs the receive path that follows (bridge, veth, the next
namespace's stack), instead of masqd's thread within the write.

python-pytun only opens the device; all I/O is done by the data plane with
``os.read``/``os.write`` on ``fileno()`` (pytun's own read raises pytun.Error
on EAGAIN instead of BlockingIOError).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masqd.config import Interface

log = logging.getLogger("masqd.dataplane")

NETNS_DIR = "/run/netns"
VNET_HDR_SIZE = 10


class DeviceError(Exception):
    """A device that cannot be opened or placed; the message says which and why."""


def local_mac(name: str, address: str) -> bytes:
    """A stable locally-administered unicast MAC derived from the interface name and address."""
    h = bytearray(hashlib.sha256(f"masqd:{name}:{address}".encode()).digest()[:6])
    h[0] = (h[0] & 0xFC) | 0x02
    return bytes(h)


def parse_mac(text: str) -> bytes:
    return bytes(int(p, 16) for p in text.split(":"))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETIFF = 0x800454D2
TUNGETFEATURES = 0x800454CF
IFF_NAPI = 0x0010
IFF_NAPI_FRAGS = 0x0020
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_DEVICE = "/dev/net/tun"
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
OFFLOAD_ALL = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6
# tried in order: TSO needs CSUM (EINVAL otherwise); USO4 and USO6 go together; older kernels lack USO
OFFLOAD_STEPS = (OFFLOAD_ALL, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, TUN_F_CSUM, 0)
_OFFLOAD_NAMES = ((TUN_F_CSUM, "csum"), (TUN_F_TSO4, "tso4"), (TUN_F_TSO6, "tso6"), (TUN_F_USO4, "uso4"),
                  (TUN_F_USO6, "uso6"))


def offload_names(flags: int) -> str:
    """``csum,tso4,...`` for a TUN_F_* set, or ``none``."""
    return ",".join(n for f, n in _OFFLOAD_NAMES if flags & f) or "none"


def set_offload(fd: int, wanted: int) -> int:
    """Ask the kernel for the offloads in ``wanted`` (falling back step by step); return what it took."""
    for step in OFFLOAD_STEPS:
        flags = step & wanted
        if step and not flags:
            continue
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError:
            continue
    return 0


def tun_features(path: str = TUN_DEVICE) -> dict[str, bool]:
    """What this kernel's TUN driver supports, asked with TUNGETFEATURES on a fresh fd of
    /dev/net/tun (no device is created, no namespace needed). Raises OSError when the
    driver is missing or refuses."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, TUNGETFEATURES, struct.pack("I", 0))
    finally:
        os.close(fd)
    flags = int(struct.unpack("I", buf)[0])
    return {"vnet_hdr": bool(flags & IFF_VNET_HDR), "multi_queue": bool(flags & IFF_MULTI_QUEUE),
            "napi": bool(flags & IFF_NAPI), "napi_frags": bool(flags & IFF_NAPI_FRAGS)}


def _write_sysfs(name: str, netns: str | None, leaf: str, value: str) -> None:
    """Write ``value`` to /sys/class/net/NAME/LEAF (a device's sysfs is only visible from inside
    its namespace, hence ``ip netns exec``)."""
    path = f"/sys/class/net/{name}/{leaf}"
    if netns:
        import subprocess

        cp = subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", f"echo {value} > {path}"],
                            capture_output=True, text=True, timeout=10)
        if cp.returncode != 0:
            raise DeviceError(f"{name}: cannot set {leaf} in {netns}: {cp.stderr.strip()}")
        return
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        raise DeviceError(f"{name}: cannot set {leaf}: {exc}") from None


def set_threaded(name: str, netns: str | None, on: bool = True) -> None:
    """Threaded NAPI for a device opened with IFF_NAPI: its receive work runs in a kernel thread
    (``on``), or in the writer's thread (off; the kernel allows the switch at any time)."""
    _write_sysfs(name, netns, "threaded", "1" if on else "0")


def device_flags(fd: int) -> int:
    """The IFF_* flags of the device behind ``fd`` (TUNGETIFF)."""
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return int(struct.unpack_from("H", ifr, 16)[0])


def set_rps(name: str, netns: str | None, mask: int, queues: int = 1) -> None:
    """Receive packet steering for the device's queues: what masqd writes is processed by the
    kernel on the CPUs in ``mask``."""
    for q in range(queues):
        _write_sysfs(name, netns, f"queues/rx-{q}/rps_cpus", f"{mask:x}")


@dataclass
class Device:
    """An open TUN or TAP device (kernel side placed and up); ``fd`` is non-blocking."""

    name: str
    mode: str  # "tun" | "tap"
    mtu: int
    netns: str | None
    persistent: bool
    handle: Any  # the pytun object, kept so the fd stays open
    fd: int = -1
    closed: bool = field(default=False)
    vnet: bool = False  # every read and write starts with a virtio-net header (masqd.wire.vnet)
    offload: int = 0  # TUN_F_* flags in force
    napi: str = "off"  # "threaded": writes are queued, a kernel thread receives them; "adaptive": switchable
    # IFF_MULTI_QUEUE: the fd of every queue (fds[0] == fd) and the handles of queues 1..
    fds: list[int] = field(default_factory=list)
    queue_handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.fds and self.fd >= 0:
            self.fds = [self.fd]

    def close(self) -> None:
        """Close the fds; a non-persistent device disappears with them."""
        if self.closed:
            return
        self.closed = True
        for h in [*self.queue_handles, self.handle]:
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass


def _enter(netns: str) -> None:
    from pyroute2 import netns as pnetns

    if not os.path.exists(os.path.join(NETNS_DIR, netns)):
        raise DeviceError(f"network namespace {netns!r} does not exist ({NETNS_DIR}/{netns})")
    pnetns.pushns()
    try:
        pnetns.setns(netns, flags=0)
    except Exception as exc:
        pnetns.dropns()  # we never left: going "back" would be one more setns, refused the same way
        hint = " (setns(2) into a network namespace needs CAP_SYS_ADMIN)" \
            if isinstance(exc, PermissionError) else ""
        raise DeviceError(f"cannot enter network namespace {netns!r}: {exc}{hint}") from None


def _leave() -> None:
    from pyroute2 import netns as pnetns

    pnetns.popns()


def _open_pytun(name: str, mode: str, vnet: bool = False, napi: bool = False, mq: bool = False) -> Any:
    import pytun

    flags = (pytun.IFF_TAP if mode == "tap" else pytun.IFF_TUN) | pytun.IFF_NO_PI
    if vnet:
        flags |= pytun.IFF_VNET_HDR
    if napi:
        flags |= IFF_NAPI
    if mq:
        flags |= IFF_MULTI_QUEUE
    try:
        return pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as exc:
        raise DeviceError(f"cannot open {mode} device {name!r}: {exc}") from None


def _configure(name: str, mtu: int, netns: str | None, bridge: str | None) -> None:
    from pyroute2 import IPRoute

    try:
        ipr = IPRoute(netns=netns) if netns else IPRoute()
    except Exception as exc:  # noqa: BLE001
        raise DeviceError(f"netlink in {netns or 'own namespace'}: {exc}") from None
    with ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise DeviceError(f"device {name!r} vanished from {netns or 'own namespace'}")
        kw: dict[str, Any] = {"mtu": mtu, "state": "up"}
        if bridge:
            br = ipr.link_lookup(ifname=bridge)
            if not br:
                raise DeviceError(f"bridge {bridge!r} not found in {netns or 'own namespace'}")
            kw["master"] = br[0]
        try:
            ipr.link("set", index=idx[0], **kw)
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"cannot set up {name!r} (mtu {mtu}, bridge {bridge}): {exc}") from None


def open_device(iface: Interface, napi: str = "off", queues: int = 1) -> Device:
    """Open (create or attach to) the device of an interface section and place it.

    ``queues``: with more than one, the device is opened with IFF_MULTI_QUEUE and
    one fd per queue (``Device.fds``): the kernel spreads the flows it sends to the
    device over the queues, one flow on one queue. A device that cannot take more
    queues (a persistent one created without ``multi_queue``, an old kernel) is
    opened with one, with a warning.

    ``napi = "threaded"``: IFF_NAPI, then threaded NAPI once the device is in
    place (``Device.napi`` says what was obtained: a kernel that refuses either
    step leaves the device working the usual way, with a warning). "adaptive":
    the same, with the thread off until the data plane turns it on.
    """
    vnet = bool(iface.offload)
    want_napi = napi in ("threaded", "adaptive")

    got_napi = want_napi

    def _open1(mq: bool, name: str = iface.name) -> Any:
        nonlocal got_napi
        if not got_napi:
            return _open_pytun(name, iface.mode, vnet, mq=mq)
        try:
            return _open_pytun(name, iface.mode, vnet, napi=True, mq=mq)
        except DeviceError as exc:
            if mq:
                raise
            got_napi = False
            log.warning("%s: IFF_NAPI refused (%s): writes are received in masqd's thread", iface.name, exc)
            return _open_pytun(iface.name, iface.mode, vnet)

    def _open() -> tuple[Any, list[Any]]:
        """The first queue's handle and the others' (IFF_MULTI_QUEUE when more than one is
        wanted). A persistent device keeps the kind it was made with: one made with one queue
        gives one, one made multiqueue is attached to as such (with one queue if one is wanted)."""
        want_mq = queues > 1
        try:
            first = _open1(want_mq)
        except DeviceError as exc:
            try:
                first = _open1(not want_mq)
            except DeviceError:
                raise exc from None
            if want_mq:
                log.warning("%s: multiqueue refused (%s): one queue, read by one thread", iface.name, exc)
                return first, []
        more: list[Any] = []
        try:
            for _ in range(queues - 1):
                more.append(_open1(True, first.name))
        except DeviceError as exc:
            log.warning("%s: only %d of %d queues (%s)", iface.name, 1 + len(more), queues, exc)
        return first, more

    if iface.netns:
        _enter(iface.netns)
        try:
            handle, extra = _open()
        finally:
            _leave()
    else:
        handle, extra = _open()
    dev = Device(iface.name, iface.mode, iface.mtu, iface.netns, iface.persistent, handle, queue_handles=extra)
    try:
        if iface.persistent:
            handle.persist(True)
        dev.fd = handle.fileno()
        dev.fds = [dev.fd] + [h.fileno() for h in extra]
        if vnet:
            try:
                for fd in dev.fds:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                dev.vnet = True
            except OSError as exc:
                raise DeviceError(f"{iface.name}: virtio-net header size refused: {exc}") from None
            # until both sides agree (Dataplane.open), nothing is offloaded: plain packets
            set_offload(dev.fd, 0)
        _configure(handle.name, iface.mtu, iface.netns, iface.bridge)
        if want_napi and device_flags(dev.fd) & IFF_NAPI:
            try:
                # adaptive: the switch is tried once here (inline at first; the data plane turns
                # the thread on under load)
                set_threaded(handle.name, iface.netns, napi == "threaded")
                dev.napi = napi
            except DeviceError as exc:
                log.warning("%s: threaded NAPI refused (%s): writes are received in masqd's thread",
                            iface.name, exc)
        for fd in dev.fds:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    except BaseException:
        dev.close()
        raise
    return dev


def open_alive_device(name: str) -> Device:
    """A TUN device in masqd's own namespace, up, carrying nothing: it exists while masqd runs
    (closed, or masqd killed, it disappears), for a process watcher such as keepalived's
    ``track_interface`` (masqd.ops.ha). Call it outside the event loop (netlink, sync API)."""
    handle = _open_pytun(name, "tun")
    dev = Device(name, "tun", 1500, None, False, handle)
    try:
        dev.fd = handle.fileno()
        _configure(handle.name, 1500, None, None)
    except BaseException:
        dev.close()
        raise
    return dev
