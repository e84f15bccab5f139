"""The operator subcommands of ``masqd`` that talk to a running daemon over its control socket.

``masqd table [--json] [--count] [-s/-d/-p/--sport/--dport/--state] [FILTER]``,
``masqd events [--json] [-e new,update,destroy] [--duration S] [same filters]``
(a stream of table changes, like ``conntrack -E``), ``masqd stats [--json]``,
``masqd rules list``, ``masqd flush [FILTER]``, ``masqd wan-address set ADDR``,
``masqd reload``, ``masqd save``, ``masqd role [active|backup|fault]`` (an active/backup
pair; keepalived's FIFO script says it), ``masqd capture --iface lan|wan -w FILE
[--duration S]``. Each finds the socket
from ``--socket``, else ``$MASQD_SOCKET``, else ``control.socket`` of ``-c CONFIG``,
else the default ``/run/masqd/masqd.sock``. Errors are one line on stderr and
exit status 1 (daemon unreachable or request refused) or 2 (usage).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from masqd.ops.control import (
    ControlError,
    format_rules,
    format_stats,
    format_table,
    request,
    stream,
)

DEFAULT_SOCKET = "/run/masqd/masqd.sock"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return str(args.socket)
    env = os.environ.get("MASQD_SOCKET")
    if env:
        return env
    if getattr(args, "config", None):
        from masqd.config import ConfigError, load

        try:
            return load(args.config).control.socket
        except ConfigError as exc:
            print(f"masqd: {exc.source}: cannot read control.socket: {'; '.join(exc.errors)}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
    return DEFAULT_SOCKET


def _call(args: argparse.Namespace, req: dict[str, Any]) -> Any:
    try:
        return request(socket_path(args), req, timeout=args.timeout)
    except ControlError as exc:
        print(f"masqd: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAIL) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help=f"control socket (default: $MASQD_SOCKET, -c's, or {DEFAULT_SOCKET})")
    p.add_argument("-c", "--config", help="read the control socket path from this config")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")


# conntrack-style options -> the filter's keys
_MATCH_OPTIONS = (("src", "src"), ("dst", "dst"), ("proto", "proto"), ("sport", "sport"), ("dport", "dport"),
                  ("state", "state"))


def _filter_text(args: argparse.Namespace) -> str:
    words = list(args.filter)
    for attr, key in _MATCH_OPTIONS:
        v = getattr(args, attr, None)
        if v is not None:
            words.append(f"{key}={v}")
    return " ".join(words)


def _match_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conntrack-style filters (the entry's original direction)")
    g.add_argument("-s", "--src", help="source address or network (the LAN host, or the remote for a port forward)")
    g.add_argument("-d", "--dst", help="destination address or network")
    g.add_argument("-p", "--proto", help="protocol: tcp, udp, icmp, esp, isakmp, gre, or a number")
    g.add_argument("--sport", help="source port (TCP, UDP)")
    g.add_argument("--dport", help="destination port (TCP, UDP)")
    g.add_argument("--state", help="state, e.g. ESTABLISHED, SYN_SENT, UNREPLIED, PENDING")
    p.add_argument("filter", nargs="*", help="key=value filters: proto lan wan remote state src dst sport dport "
                   "(e.g. proto=tcp lan=10.0.0.2 remote=198.51.100.1)")


def cmd_table(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "table"}
    flt = _filter_text(args)
    if flt:
        req["filter"] = flt
    if args.count:
        req["count"] = True
        res = _call(args, req)
        print(json.dumps(res) if args.json else res["count"])
        return EXIT_OK
    rows = _call(args, req)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "events", "format": "json" if args.json else "text"}
    flt = _filter_text(args)
    if flt:
        req["filter"] = flt
    if args.event:
        req["events"] = [k.strip().lower() for k in args.event.split(",") if k.strip()]
    try:
        for line in stream(socket_path(args), req, timeout=args.timeout, duration=args.duration):
            if line.startswith("# masqd:") or line.startswith('{"dropped"'):
                print(f"masqd: {line.removeprefix('# masqd: ')}", file=sys.stderr)
                return EXIT_FAIL
            print(line, flush=True)
    except ControlError as exc:
        print(f"masqd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:  # masqd events | head
        return EXIT_OK
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    stats = _call(args, {"cmd": "stats"})
    print(json.dumps(stats, indent=1, sort_keys=True) if args.json else format_stats(stats))
    return EXIT_OK


def cmd_rules(args: argparse.Namespace) -> int:
    rows = _call(args, {"cmd": "rules"})
    print(json.dumps(rows, indent=1) if args.json else format_rules(rows))
    return EXIT_OK


def cmd_flush(args: argparse.Namespace) -> int:
    res = _call(args, {"cmd": "flush", "filter": " ".join(args.filter)})
    print(f"removed {res['removed']} entries")
    return EXIT_OK


def cmd_wan_address(args: argparse.Namespace) -> int:
    res = _call(args, {"cmd": "wan-address", "action": "set", "address": args.address})
    print(f"WAN address now {res['address']}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    res = _call(args, {"cmd": "reload"})
    print(f"reloaded {res['source']}")
    return EXIT_OK


def cmd_save(args: argparse.Namespace) -> int:
    res = _call(args, {"cmd": "save"})
    print(f"state saved to {res['path']} ({res['bytes']} bytes, {res['seconds']} s)")
    return EXIT_OK


def cmd_role(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "role"}
    if args.role:
        req.update(role=args.role, by="cli")
    res = _call(args, req)
    if args.role and res.get("old") != res.get("role"):
        print(f"role {res['role']} (was {res['old']})")
    else:
        print(f"role {res['role']}")
    return EXIT_OK


def cmd_capture(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.write or f"masqd-{args.iface}.pcap")
    res = _call(args, {"cmd": "capture", "action": "start", "iface": args.iface, "path": path})
    until = f"for {args.duration:g}s" if args.duration else "Ctrl-C to stop"
    print(f"capturing {args.iface} to {res['path']} (linktype {res['linktype']}); {until}", file=sys.stderr)
    done = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        done.wait(args.duration if args.duration else None)
    finally:
        signal.signal(signal.SIGINT, old)
        stopped = _call(args, {"cmd": "capture", "action": "stop", "iface": args.iface})
    print(f"{stopped.get(args.iface, 0)} packets written to {path}")
    return EXIT_OK


def _parser(sub: argparse._SubParsersAction, name: str, help: str,
            func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    _common(p)
    p.set_defaults(func=func)
    return p


def add_table(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "table", "list the masquerade table (like ipchains -M -L, conntrack -L)", cmd_table)
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    p.add_argument("-C", "--count", action="store_true", help="only the number of (matching) entries")
    _match_options(p)


def add_events(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "events", "stream the table's changes: new, update, destroy (like conntrack -E)",
                cmd_events)
    p.add_argument("--json", action="store_true", help="JSON lines instead of conntrack-style lines")
    p.add_argument("-e", "--event", help="only these kinds, e.g. new,destroy (default: all)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    _match_options(p)


def add_stats(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "stats", "counters of the running daemon", cmd_stats)
    p.add_argument("--json", action="store_true")


def add_rules(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "rules", "firewall rules: masqd rules list (hit counters of the running daemon); "
                "masqd rules check FILE (offline: validate a rules file, see masqd rules check --help)",
                cmd_rules)
    p.add_argument("action", choices=["list"], help="list: the running daemon's rules with hit counters "
                   "(check FILE is handled offline, before this parser)")
    p.add_argument("--json", action="store_true")


def add_flush(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "flush", "remove masquerade entries (all, or proto=P / lan=ADDR)", cmd_flush)
    p.add_argument("filter", nargs="*")


def add_wan_address(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "wan-address", "tell masqd its new WAN address: wan-address set ADDR[/LEN]",
                cmd_wan_address)
    p.add_argument("action", choices=["set"])
    p.add_argument("address")


def add_reload(sub: argparse._SubParsersAction) -> None:
    _parser(sub, "reload", "re-read and validate the config, swap it in (like SIGHUP)", cmd_reload)


def add_save(sub: argparse._SubParsersAction) -> None:
    _parser(sub, "save", "write the state file now (the table kept across a restart; [state] in the config)",
            cmd_save)


def add_role(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "role", "an active/backup pair: show or set this masqd's role (keepalived sets it)", cmd_role)
    p.add_argument("role", nargs="?", choices=["active", "backup", "fault"])


def add_capture(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "capture", "write a pcap of what masqd reads and writes on one side", cmd_capture)
    p.add_argument("--iface", choices=["lan", "wan"], required=True)
    p.add_argument("-w", "--write", help="pcap file (written by the daemon; default masqd-IFACE.pcap)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: Ctrl-C)")


OPS_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_table, add_events, add_stats, add_rules, add_flush, add_wan_address, add_reload, add_capture,
    add_save, add_role,
]
