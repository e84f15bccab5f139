"""VPN peer roles (what runs inside a guest) and the host-side handle of a running peer.

A role builder returns a `PeerSpec`: the guest image, the segment and address,
the ``run.sh`` body and the config files it needs. Servers mark ``ready`` once
their daemon listens; clients bring the tunnel up, ping a host behind the far
gateway through it, write ``result.txt`` (``tunnel_rc``, ``ping_rc``,
``ping_received``, ``ping_sent``, ``elapsed``) and mark ``done``. `Peer` writes the files to
the per-peer host folder, starts the guest, waits on those marker files and
reads the results; nothing is parsed from the console.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .images import IMAGES
from .uml import UmlGuest

PSK = "masqd-interop-psk"
BEHIND_SERVER = "10.99.0.1"  # a host "behind" every IPsec gateway (loopback address)
PPTP_SERVER_IP = "10.77.0.1"  # pptpd's end of each PPP link
STATUS_LOOPS = 400  # status-dump iterations (x 3 s) before an idle guest powers off

Role = Literal["server", "client"]


@dataclass(frozen=True)
class PeerSpec:
    """Everything needed to start one peer guest."""

    name: str  # short (tap name = prefix + name, 15 chars max)
    image: str  # key of images.IMAGES
    segment: str  # lan | wan | rem
    address: str  # CIDR on the guest's NIC
    gateway: str | None
    role: Role
    script: str  # body of run.sh after the common prelude
    files: dict[str, str] = field(default_factory=dict)
    logs: tuple[str, ...] = ()  # daemon log files written under /peer


def _prelude(spec_address: str, gateway: str | None) -> str:
    gw = f" {gateway}" if gateway else ""
    return (
        "#!/bin/sh\n"
        ". /usr/local/lib/masqd-peer.sh\n"
        "set -x\n"
        ": > /peer/result.txt\n"
        f"net_up {spec_address}{gw}\n"
    )


def _client_ping(target: str, source: str | None = None, wait: int = 15) -> str:
    src = f" -I {source}" if source else ""
    return (
        # -w: keep sending until 5 replies or `wait` s (a first packet may be held back while
        # another LAN host's IPsec exchange is pending, as SPEC 3 allows).
        f"ping -n -c 5 -i 0.3 -w {wait}{src} {target} > /peer/ping.log 2>&1; result ping_rc $?\n"
        "result ping_received \"$(sed -n 's/.* \\([0-9]*\\) received.*/\\1/p' /peer/ping.log)\"\n"
        "result ping_sent \"$(sed -n 's/^\\([0-9]*\\) packets transmitted.*/\\1/p' /peer/ping.log)\"\n"
    )


_CLIENT_END = (
    'result elapsed "$(echo "$(uptime_s) $t0" | awk \'{printf "%.1f", $1 - $2}\')"\n'
    "ip -s xfrm state > /peer/xfrm.txt 2>&1\n"
    "mark_done\n"
    f"i=0; while [ $i -lt {STATUS_LOOPS} ]; do sleep 3; i=$((i+1)); done\n"
)


def _status_loop(command: str) -> str:
    return (
        f"i=0; while [ $i -lt {STATUS_LOOPS} ]; do {command} > /peer/status.txt 2>&1; "
        "sleep 3; i=$((i+1)); done\n"
    )


_CHARON_LOG = """charon {
  filelog {
    peer {
      path = /peer/charon.log
      time_format = %T
      default = 1
      ike = 2
      cfg = 2
    }
  }
}
"""

_START_CHARON = (
    "cp /peer/charon-log.conf /etc/strongswan.d/masqd-peer-log.conf\n"
    "cp /peer/swanctl.conf /etc/swanctl/swanctl.conf\n"
    "/usr/lib/ipsec/charon > /peer/charon.out 2>&1 &\n"
    "wait_for 15 swanctl --load-all\n"
    "swanctl --load-all > /peer/load.log 2>&1\n"
)


def strongswan_responder(
    name: str, address: str, gateway: str | None, pool: str = "10.98.0.0/24"
) -> PeerSpec:
    """strongSwan (charon + swanctl) responder for IKEv1 and IKEv2, PSK, virtual IP pool."""
    local = address.split("/")[0]
    swanctl = f"""connections {{
  rw {{
    version = 0
    local_addrs = {local}
    proposals = aes128-sha256-modp2048
    pools = vpool
    local {{
      auth = psk
      id = srv.example
    }}
    remote {{
      auth = psk
    }}
    children {{
      net {{
        local_ts = {BEHIND_SERVER}/32
        esp_proposals = aes128-sha256
      }}
    }}
  }}
}}
pools {{
  vpool {{
    addrs = {pool}
  }}
}}
secrets {{
  ike-any {{
    secret = "{PSK}"
  }}
}}
"""
    script = (
        _prelude(address, gateway)
        + f"ip addr add {BEHIND_SERVER}/32 dev lo\n"
        + _START_CHARON
        + "mark_ready\n"
        + _status_loop("swanctl --list-sas")
    )
    return PeerSpec(
        name, "strongswan", "rem" if local.startswith("198.51.100.") else "wan", address,
        gateway, "server", script,
        {"swanctl.conf": swanctl, "charon-log.conf": _CHARON_LOG}, ("charon.log",),
    )  # fmt: skip


def strongswan_initiator(
    name: str,
    address: str,
    gateway: str | None,
    server: str,
    ike: int = 2,
    index: int = 1,
    initiate_timeout: int = 30,
    segment: str = "lan",
) -> PeerSpec:
    """strongSwan initiator asking for a virtual IP; pings the host behind the server."""
    swanctl = f"""connections {{
  home {{
    version = {ike}
    remote_addrs = {server}
    vips = 0.0.0.0
    proposals = aes128-sha256-modp2048
    local {{
      auth = psk
      id = c{index}.example
    }}
    remote {{
      auth = psk
      id = srv.example
    }}
    children {{
      net {{
        remote_ts = {BEHIND_SERVER}/32
        esp_proposals = aes128-sha256
      }}
    }}
  }}
}}
secrets {{
  ike-any {{
    secret = "{PSK}"
  }}
}}
"""
    script = (
        _prelude(address, gateway)
        + _START_CHARON
        + "mark_ready\n"
        + "t0=$(uptime_s)\n"
        + f"swanctl --initiate --child net --timeout {initiate_timeout} > /peer/initiate.log 2>&1;"
        " result tunnel_rc $?\n"
        + _client_ping(BEHIND_SERVER)
        + "swanctl --list-sas > /peer/sas.txt 2>&1\n"
        + _CLIENT_END
    )
    return PeerSpec(
        name, "strongswan", segment, address, gateway, "client", script,
        {"swanctl.conf": swanctl, "charon-log.conf": _CHARON_LOG}, ("charon.log",),
    )  # fmt: skip


def _libreswan_conn(
    conn: str, ike: int, left: str, leftid: str, leftsubnet: str, right: str, rightid: str,
    rightsubnet: str, encapsulation: str,
) -> str:  # fmt: skip
    lines = [
        f"conn {conn}",
        f"    ikev2={'yes' if ike == 2 else 'no'}",
        "    authby=secret",
        f"    left={left}",
        f"    leftid={leftid}",
        f"    leftsubnet={leftsubnet}",
        f"    right={right}",
        f"    rightid={rightid}",
        f"    rightsubnet={rightsubnet}",
        f"    encapsulation={encapsulation}",
        "    ike=aes128-sha2_256;modp2048",
        "    esp=aes128-sha2_256",
    ]
    if encapsulation == "no" and ike == 1:
        lines.append("    nat-ikev1-method=none")
    return "\n".join(lines) + "\n"


_LIBRESWAN_SETUP = (
    "config setup\n    logfile=/peer/pluto.log\n    logtime=yes\n    ikev1-policy=accept\n\n"
)

_START_PLUTO = (
    "cp /peer/ipsec.conf /etc/ipsec.conf\n"
    "cp /peer/ipsec.secrets /etc/ipsec.secrets; chmod 600 /etc/ipsec.secrets\n"
    "mkdir -p /run/pluto /var/lib/ipsec/nss\n"
    "ipsec initnss > /peer/initnss.log 2>&1\n"
    "ipsec pluto --config /etc/ipsec.conf\n"
    "wait_for 15 ipsec whack --status\n"
)


def libreswan_client_subnet(index: int) -> str:
    """The /32 a libreswan initiator number ``index`` puts on its loopback."""
    return f"10.96.{index}.1"


def libreswan_responder(
    name: str,
    address: str,
    gateway: str | None,
    clients: range = range(1, 9),
    encapsulation: str = "no",
) -> PeerSpec:
    """libreswan (pluto) responder with one IKEv1 and one IKEv2 conn per client number."""
    local = address.split("/")[0]
    conf = _LIBRESWAN_SETUP
    for n in clients:
        for ike in (1, 2):
            conf += _libreswan_conn(
                f"c{n}-v{ike}", ike, local, "@srv.example", f"{BEHIND_SERVER}/32", "%any",
                f"@c{n}.example", f"{libreswan_client_subnet(n)}/32", encapsulation,
            )  # fmt: skip
    script = (
        _prelude(address, gateway)
        + f"ip addr add {BEHIND_SERVER}/32 dev lo\n"
        + _START_PLUTO
        + "for c in $(sed -n 's/^conn //p' /etc/ipsec.conf); do ipsec auto --add $c; done"
        " > /peer/add.log 2>&1\n" + "mark_ready\n" + _status_loop("ipsec trafficstatus")
    )
    return PeerSpec(
        name, "libreswan", "rem" if local.startswith("198.51.100.") else "wan", address,
        gateway, "server", script,
        {"ipsec.conf": conf, "ipsec.secrets": f': PSK "{PSK}"\n'}, ("pluto.log",),
    )  # fmt: skip


def libreswan_initiator(
    name: str,
    address: str,
    gateway: str | None,
    server: str,
    ike: int = 2,
    index: int = 1,
    encapsulation: str = "no",
    segment: str = "lan",
    ping_wait: int = 15,
) -> PeerSpec:
    """libreswan initiator; ``encapsulation="no"`` forces raw ESP (no NAT-T); it pings through
    its tunnel until 5 replies or ``ping_wait`` seconds."""
    local = address.split("/")[0]
    sub = libreswan_client_subnet(index)
    conf = _LIBRESWAN_SETUP + _libreswan_conn(
        "home", ike, local, f"@c{index}.example", f"{sub}/32", server, "@srv.example",
        f"{BEHIND_SERVER}/32", encapsulation,
    )  # fmt: skip
    script = (
        _prelude(address, gateway)
        + f"ip addr add {sub}/32 dev lo\n"
        + _START_PLUTO
        + "ipsec auto --add home > /peer/add.log 2>&1\n"
        + "mark_ready\n"
        + "t0=$(uptime_s)\n"
        + "timeout 40 ipsec auto --up home > /peer/initiate.log 2>&1; result tunnel_rc $?\n"
        + _client_ping(BEHIND_SERVER, sub, ping_wait)
        + "ipsec trafficstatus > /peer/sas.txt 2>&1\n"
        + _CLIENT_END
    )
    return PeerSpec(
        name, "libreswan", segment, address, gateway, "client", script,
        {"ipsec.conf": conf, "ipsec.secrets": f': PSK "{PSK}"\n'}, ("pluto.log",),
    )  # fmt: skip


# The updown hook of a client that announces its SPIs to masqd (issue 22): libreswan's own
# script first (routes), then the shipped client (/usr/local/sbin, see images.GUEST_FILES).
SPI_UPDOWN = (
    "#!/bin/sh\n"
    "ipsec _updown \"$@\"\nrc=$?\n"
    "MASQD_SPI_LOG=/peer/announce-trace.log /usr/local/sbin/masqd-spi-announce >> /peer/announce.log 2>&1\n"
    "exit $rc\n"
)


def libreswan_rekeying_initiator(
    name: str,
    address: str,
    gateway: str | None,
    server: str,
    ike: int = 2,
    index: int = 1,
    announce: bool = False,
    rekeys: int = 2,
    pings: int = 150,
    interval: float = 0.2,
) -> PeerSpec:
    """libreswan raw-ESP initiator that re-keys on the host's signal while it pings.

    Once its tunnel is up it writes ``/peer/up`` and pings the host behind the
    gateway every ``interval`` seconds (``pings`` in all); for each ``k`` in 1..``rekeys`` it waits for
    the file ``/peer/rekey<k>`` (the harness writes it into every client's folder at
    the same moment) and forces a re-key of its IPsec SA. Every SA its kernel
    installs is logged by ``ip xfrm monitor`` to ``/peer/xfrm-monitor.txt`` (the
    ground truth of which SPIs are its own). With ``announce`` its updown hook runs
    masqd-spi-announce (``SPI_UPDOWN``)."""
    local = address.split("/")[0]
    sub = libreswan_client_subnet(index)
    conf = _LIBRESWAN_SETUP + _libreswan_conn(
        "home", ike, local, f"@c{index}.example", f"{sub}/32", server, "@srv.example",
        f"{BEHIND_SERVER}/32", "no",
    )  # fmt: skip
    files = {"ipsec.secrets": f': PSK "{PSK}"\n'}
    if announce:
        conf += "    leftupdown=/peer/updown\n"
        files["updown"] = SPI_UPDOWN
    files["ipsec.conf"] = conf
    rekey = "".join(
        f"n=0; while [ ! -e /peer/rekey{k} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; "
        f"ipsec whack --rekey-ipsec --name home --async"
        f" > /peer/rekey{k}.log 2>&1; echo \"rekey {k} at $(uptime_s)\" >> /peer/rekeys.txt\n"
        for k in range(1, rekeys + 1)
    )
    script = (
        _prelude(address, gateway)
        + f"ip addr add {sub}/32 dev lo\n"
        + "chmod 755 /peer/updown 2>/dev/null\n"
        + "ip xfrm monitor > /peer/xfrm-monitor.txt 2>&1 &\n"
        + _START_PLUTO
        + "ipsec auto --add home > /peer/add.log 2>&1\n"
        + "mark_ready\n"
        + "t0=$(uptime_s)\n"
        + "timeout 40 ipsec auto --up home > /peer/initiate.log 2>&1; result tunnel_rc $?\n"
        + "touch /peer/up\n"
        + f"ping -n -i {interval} -c {pings} -w {int(pings * interval) + 30} -I {sub} {BEHIND_SERVER}"
        " > /peer/ping.log 2>&1 &\n"
        + "pp=$!\n"
        + rekey
        + "wait $pp; result ping_rc $?\n"
        + "result ping_received \"$(sed -n 's/.* \\([0-9]*\\) received.*/\\1/p' /peer/ping.log)\"\n"
        + "result ping_sent \"$(sed -n 's/^\\([0-9]*\\) packets transmitted.*/\\1/p' /peer/ping.log)\"\n"
        + "ipsec trafficstatus > /peer/sas.txt 2>&1\n"
        + _CLIENT_END
    )
    return PeerSpec(name, "libreswan", "lan", address, gateway, "client", script, files, ("pluto.log",))


PPTP_USERS = {f"user{n}": f"secret{n}" for n in range(1, 9)}


def pptp_server(
    name: str, address: str, gateway: str | None, image: str = "strongswan"
) -> PeerSpec:
    """pptpd with MS-CHAPv2 + MPPE-128; PPP links get 10.77.0.100-199."""
    local = address.split("/")[0]
    options = "\n".join([
        "name pptpd", "refuse-pap", "refuse-chap", "refuse-mschap", "require-mschap-v2",
        "require-mppe-128", "nodefaultroute", "lock", "nobsdcomp", "novj", "novjccomp",
        "nologfd", "logfile /peer/pppd.log", "debug",
    ]) + "\n"  # fmt: skip
    secrets = "".join(f"{u} pptpd {p} *\n" for u, p in PPTP_USERS.items())
    script = (
        _prelude(address, gateway)
        + "cp /peer/pptpd.conf /etc/pptpd.conf\n"
        + "cp /peer/pptpd-options /etc/ppp/pptpd-options\n"
        + "cp /peer/chap-secrets /etc/ppp/chap-secrets; chmod 600 /etc/ppp/chap-secrets\n"
        + "pptpd > /peer/pptpd.out 2>&1\n"
        + "wait_for 10 sh -c 'cat /proc/net/tcp | grep -q \":06BB 00000000:0000 0A\"'\n"
        + "mark_ready\n"
        + _status_loop("ip -br addr")
    )
    return PeerSpec(
        name, image, "rem" if local.startswith("198.51.100.") else "wan", address, gateway,
        "server", script,
        {
            "pptpd.conf": f"option /etc/ppp/pptpd-options\nlocalip {PPTP_SERVER_IP}\n"
            "remoteip 10.77.0.100-199\n",
            "pptpd-options": options,
            "chap-secrets": secrets,
        },
        ("pppd.log",),
    )  # fmt: skip


def pptp_client(
    name: str,
    address: str,
    gateway: str | None,
    server: str,
    user: str = "user1",
    image: str = "strongswan",
    segment: str = "lan",
) -> PeerSpec:
    """pptp-linux + pppd client (MS-CHAPv2, MPPE-128); pings pptpd's link address."""
    script = (
        _prelude(address, gateway)
        + "cp /peer/chap-secrets /etc/ppp/chap-secrets; chmod 600 /etc/ppp/chap-secrets\n"
        + "mark_ready\n"
        + "t0=$(uptime_s)\n"
        + f'timeout 25 pppd pty "pptp {server} --nolaunchpppd --loglevel 1" name {user}'
        " remotename pptpd require-mppe-128 refuse-eap noauth nodefaultroute lock nobsdcomp"
        " nodeflate logfile /peer/pppd.log debug updetach maxfail 1"
        " > /peer/initiate.log 2>&1; result tunnel_rc $?\n"
        # updetach returns once IPV6CP is up, maybe before IPCP: wait for the IPv4 peer address
        # (else the first ping takes the default route and an ICMP error ends ping at once)
        + f"wait_for 10 sh -c 'ip -4 -o addr show dev ppp0 | grep -q \"peer {PPTP_SERVER_IP}/\"'\n"
        + _client_ping(PPTP_SERVER_IP)
        + "ip -br addr show ppp0 > /peer/sas.txt 2>&1\n"
        + _CLIENT_END
    )
    return PeerSpec(
        name, image, segment, address, gateway, "client", script,
        {"chap-secrets": f"{user} pptpd {PPTP_USERS[user]} *\n"}, ("pppd.log",),
    )  # fmt: skip


class PeerError(RuntimeError):
    """A peer did not reach the expected state (message says which and why)."""


@dataclass
class Peer:
    """A running (or finished) peer guest and its host folder."""

    spec: PeerSpec
    dir: Path
    tap: str
    guest: UmlGuest | None = None
    final: dict[str, str] | None = None  # result kept by stop() (the folder may go away)

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in ("ready", "done", "result.txt"):
            (self.dir / old).unlink(missing_ok=True)
        for fname, text in self.spec.files.items():
            (self.dir / fname).write_text(text)
        run_sh = self.dir / "run.sh"
        run_sh.write_text(self.spec.script)
        run_sh.chmod(0o755)

    def start(self, switch_ns: str, mem_mb: int = 160) -> Peer:
        self.prepare()
        self.guest = UmlGuest(
            self.spec.name, IMAGES[self.spec.image].path, switch_ns, self.tap, self.dir, mem_mb
        ).start()
        return self

    def _wait_file(self, fname: str, timeout: float) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if (self.dir / fname).exists():
                return time.monotonic() - t0
            if self.guest is None or not self.guest.running():
                raise PeerError(f"peer {self.spec.name}: guest exited before '{fname}' "
                                f"(see {self.dir}/console.log, run.log)")  # fmt: skip
            time.sleep(0.1)
        raise PeerError(f"peer {self.spec.name}: no '{fname}' after {timeout:.0f}s "
                        f"(see {self.dir}/run.log)")  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> float:
        return self._wait_file("ready", timeout)

    def wait_done(self, timeout: float = 60.0) -> float:
        return self._wait_file("done", timeout)

    def result(self) -> dict[str, str]:
        if self.final is not None:
            return dict(self.final)
        out: dict[str, str] = {}
        path = self.dir / "result.txt"
        if path.exists():
            for line in path.read_text().splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    out[key.strip()] = value.strip()
        return out

    def log_paths(self) -> list[Path]:
        names = (*self.spec.logs, "run.log", "console.log", "initiate.log", "ping.log", "sas.txt")
        return [self.dir / n for n in names if (self.dir / n).exists()]

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.stop()
            self.final = self.result()


# ------------------------------------------- a VPN server on a private address (issue 8)

# Shell: the echo requests this guest has received (``Icmp InEchos`` in /proc/net/snmp).
_IN_ECHOS_FN = (
    "in_echos() { awk '/^Icmp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == \"InEchos\") c = i; h = 1 }"
    " else print $c }' /proc/net/snmp; }\n"
)


def libreswan_gateway(
    name: str,
    address: str,
    gateway: str | None,
    clients: range = range(1, 9),
    segment: str = "lan",
) -> PeerSpec:
    """libreswan responder meant to sit behind masqd (portfw UDP 500 + protocol forward 50).

    Same conns as `libreswan_responder` (@ids, never raw addresses, so the NATed
    gateway's own private address does not matter); while it runs it pings each
    client's subnet from the host behind it, so traffic also starts from the
    gateway's side through every tunnel."""
    base = libreswan_responder(name, address, gateway, clients)
    subs = " ".join(libreswan_client_subnet(n) for n in clients)
    loop = (
        f"i=0; while [ $i -lt {STATUS_LOOPS * 3} ]; do ipsec trafficstatus > /peer/status.txt 2>&1; "
        f"for s in {subs}; do ping -n -c 1 -W 1 -I {BEHIND_SERVER} $s > /dev/null 2>&1 & done; "
        "wait; i=$((i+1)); done\n"
    )
    marker = "mark_ready\n"
    head = base.script[: base.script.index(marker) + len(marker)]
    return dataclasses.replace(base, segment=segment, script=head + loop)


def libreswan_remote_initiator(
    name: str,
    address: str,
    gateway: str | None,
    server: str,
    ike: int = 2,
    index: int = 1,
    reverse_wait: int = 12,
) -> PeerSpec:
    """libreswan initiator on the remote segment calling a gateway behind masqd (raw ESP).

    Besides `libreswan_initiator`'s results it records ``reverse_rc``: 0 once an
    echo request from the gateway's side reached this client's subnet through the
    tunnel (within ``reverse_wait`` seconds after its own pings)."""
    base = libreswan_initiator(name, address, gateway, server, ike, index, segment="rem")
    wait = (
        _IN_ECHOS_FN
        + f"n=0; rev=1; while [ $n -lt {reverse_wait * 2} ]; do"
        ' [ "$(in_echos)" -gt 0 ] && { rev=0; break; }; sleep 0.5; n=$((n+1)); done\n'
        + "result reverse_rc $rev\n"
    )
    end = base.script.index(_CLIENT_END)
    return dataclasses.replace(base, script=base.script[:end] + wait + base.script[end:])


def pptp_server_behind_nat(name: str, address: str, gateway: str | None) -> PeerSpec:
    """pptpd on a private LAN address (reached through masqd's portfw 1723 + protocol forward 47)."""
    return dataclasses.replace(pptp_server(name, address, gateway), segment="lan")


def pptp_remote_client(name: str, address: str, gateway: str | None, server: str, user: str) -> PeerSpec:
    """pptp-linux client on the remote segment calling a server's public address."""
    return pptp_client(name, address, gateway, server, user, segment="rem")
