"""Traffic endpoints for the lab (demo, tests, benchmark): small TCP/UDP servers and clients.

Run inside a lab namespace: ``python -m masqd.lab.nettool COMMAND ...``.
Servers print ``ready`` on stdout once listening and stop after ``--timeout``
seconds at most; clients print one JSON object and exit 0 only when the
exchange was verified (content hashes or echoes compared).

Commands::

    tcp-server PORT                 one connection: read to EOF, answer "<sha256> <peer ip:port>"
    tcp-client HOST PORT NBYTES [--sport P] [--rate BYTES/S]
                                    send NBYTES random bytes (paced), check the server's hash
    udp-echo PORT                   echo each datagram as b"<peer ip:port>|" + payload
    udp-client HOST PORT COUNT [--sport P]   send COUNT datagrams, check every echo
    udp-refused HOST PORT           expect ICMP port unreachable (ECONNREFUSED)
    udp-listen PORT                 count datagrams until the timeout, print the count
    udp-flow HOST PORT SECONDS [--sport P] [--interval S]
                                    a datagram every interval to a udp-echo server; report the
                                    addresses it saw us as, losses and the longest gap in echoes
    tcp-refused HOST PORT --sport P connect from port P to a closed port, expect a refusal
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time


def _ready() -> None:
    print("ready", flush=True)


def tcp_server(port: int, timeout: float) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4)
    srv.settimeout(timeout)
    _ready()
    conn, peer = srv.accept()
    conn.settimeout(timeout)
    h = hashlib.sha256()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        h.update(chunk)
    conn.sendall(f"{h.hexdigest()} {peer[0]}:{peer[1]}\n".encode())
    conn.close()
    return 0


def tcp_client(host: str, port: int, nbytes: int, timeout: float, sport: int = 0, rate: float = 0.0) -> int:
    data = os.urandom(nbytes)
    t0 = time.monotonic()
    s = socket.create_connection((host, port), timeout=timeout, source_address=("0.0.0.0", sport))
    if rate:  # paced: 64 KiB at a time, never ahead of rate * elapsed
        view, sent = memoryview(data), 0
        while sent < nbytes:
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
            s.sendall(view[sent:sent + 65536])
            sent += min(65536, nbytes - sent)
    else:
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    dt = time.monotonic() - t0
    digest, _, peer = reply.decode().strip().partition(" ")
    ok = digest == hashlib.sha256(data).hexdigest()
    print(json.dumps({"ok": ok, "bytes": nbytes, "seconds": round(dt, 3), "seen_as": peer}))
    return 0 if ok else 1


def udp_echo(port: int, timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    _ready()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(65535)
        except TimeoutError:
            continue
        s.sendto(f"{peer[0]}:{peer[1]}|".encode() + data, peer)
    return 0


def udp_client(host: str, port: int, count: int, sport: int, timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sport:
        s.bind(("0.0.0.0", sport))
    s.connect((host, port))
    s.settimeout(min(timeout, 2.0))
    good, peers = 0, set()
    for i in range(count):
        payload = f"{i}:".encode() + os.urandom(64 + i % 900)
        s.send(payload)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = s.recv(65535)
            except TimeoutError:
                break
            peer, _, echoed = reply.partition(b"|")
            if echoed == payload:
                good += 1
                peers.add(peer.decode())
                break
    ok = good == count
    print(json.dumps({"ok": ok, "sent": count, "echoed": good, "seen_as": sorted(peers)}))
    return 0 if ok else 1


def udp_refused(host: str, port: int, timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1.0)
    deadline = time.monotonic() + timeout
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            s.send(b"anyone there?")
            s.recv(100)
        except ConnectionRefusedError:
            refused = True
        except TimeoutError:
            continue
    print(json.dumps({"ok": refused, "refused": refused}))
    return 0 if refused else 1


def udp_flow(host: str, port: int, seconds: float, sport: int, interval: float, timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sport:
        s.bind(("0.0.0.0", sport))
    s.connect((host, port))
    s.setblocking(False)
    t0 = time.monotonic()
    end = t0 + min(seconds, timeout)
    sent = echoed = 0
    peers: set[str] = set()
    last = t0
    gap = 0.0
    nxt = t0
    while True:
        now = time.monotonic()
        if now >= nxt and now < end:
            try:
                s.send(b"%d:" % sent + b"u" * 64)
                sent += 1
            except OSError:  # e.g. ICMP unreachable reported on the socket while the router is away
                pass
            nxt += interval
        if now >= end + 1.0:
            break
        try:
            reply = s.recv(65535)
        except BlockingIOError:
            time.sleep(min(0.005, max(0.0, nxt - now)))
            continue
        except OSError:
            continue
        peer, _, _ = reply.partition(b"|")
        peers.add(peer.decode())
        echoed += 1
        gap = max(gap, now - last)
        last = now
    ok = echoed > 0 and len(peers) == 1
    print(json.dumps({"ok": ok, "sent": sent, "echoed": echoed, "seen_as": sorted(peers),
                      "longest_gap": round(gap, 3)}))
    return 0 if ok else 1


def tcp_refused(host: str, port: int, sport: int, timeout: float) -> int:
    try:
        socket.create_connection((host, port), timeout=timeout, source_address=("0.0.0.0", sport)).close()
    except ConnectionRefusedError:
        print(json.dumps({"ok": True, "refused": True}))
        return 0
    print(json.dumps({"ok": False, "refused": False}))
    return 1


def udp_listen(port: int, timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    _ready()
    n = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s.recvfrom(65535)
            n += 1
        except TimeoutError:
            continue
    print(json.dumps({"received": n}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nettool")
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("tcp-server")
    a.add_argument("port", type=int)
    a = sub.add_parser("tcp-client")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("nbytes", type=int)
    a.add_argument("--sport", type=int, default=0)
    a.add_argument("--rate", type=float, default=0.0, help="bytes per second (0: as fast as possible)")
    a = sub.add_parser("udp-echo")
    a.add_argument("port", type=int)
    a = sub.add_parser("udp-client")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("count", type=int)
    a.add_argument("--sport", type=int, default=0)
    a = sub.add_parser("udp-refused")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a = sub.add_parser("udp-listen")
    a.add_argument("port", type=int)
    a = sub.add_parser("udp-flow")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("seconds", type=float)
    a.add_argument("--sport", type=int, default=0)
    a.add_argument("--interval", type=float, default=0.05)
    a = sub.add_parser("tcp-refused")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("--sport", type=int, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "tcp-server":
            return tcp_server(args.port, args.timeout)
        if args.cmd == "tcp-client":
            return tcp_client(args.host, args.port, args.nbytes, args.timeout, args.sport, args.rate)
        if args.cmd == "udp-echo":
            return udp_echo(args.port, args.timeout)
        if args.cmd == "udp-client":
            return udp_client(args.host, args.port, args.count, args.sport, args.timeout)
        if args.cmd == "udp-refused":
            return udp_refused(args.host, args.port, args.timeout)
        if args.cmd == "udp-flow":
            return udp_flow(args.host, args.port, args.seconds, args.sport, args.interval, args.timeout)
        if args.cmd == "tcp-refused":
            return tcp_refused(args.host, args.port, args.sport, args.timeout)
        return udp_listen(args.port, args.timeout)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
