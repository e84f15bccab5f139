"""The state file on disk: masqd's masquerade state written atomically and read back, or refused.

One job: bytes and files. The engine makes and applies the document
(:mod:`masqd.engine.state`); this module frames it, bounds it, writes it and
reads it back. Format (version 1)::

    magic "MASQDST\\n" (8 bytes) | format version (u16) | flags (u16, 0) |
    payload length (u64) | SHA-256 of the payload (32 bytes) | payload

all big-endian; the payload is the document as JSON, zlib-compressed, with
the wall-clock time it was saved (``saved_at``) so the timers can be
shortened by the time masqd was down. Writing goes to a temporary file in the
same directory, fsync, rename over the old file, fsync of the directory: a
crash leaves the old file or the new one, never a mix. Reading refuses, with
a reason, anything that is not exactly such a file: a foreign file (magic), a
foreign version, a truncated or padded one (length), a corrupt one
(checksum, zlib, JSON), one larger than the table limits allow (``limit``,
checked before reading and while inflating), or a document the engine cannot
apply whole. A missing file is not an error: there is nothing to restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

MAGIC = b"MASQDST\n"
VERSION = 1
_HEAD = struct.Struct("!8sHHQ32s")
HEAD_SIZE = _HEAD.size
RECORD_MAX = 600  # bytes of JSON one record takes at most (a PPTP connection's, the largest)


class StateFileError(Exception):
    """A state file that cannot be used: ``reason`` is the counter label, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def size_limit(max_entries: int) -> int:
    """The largest document (inflated JSON bytes) a table bounded by ``max_entries`` can make:
    sessions, IPsec entries and PPTP entries are each bounded by it."""
    return 3 * max_entries * RECORD_MAX + (1 << 20)


def encode(doc: dict[str, Any], saved_at: float | None = None) -> bytes:
    body = dict(doc)
    body["saved_at"] = time.time() if saved_at is None else saved_at
    payload = zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 1)
    return _HEAD.pack(MAGIC, VERSION, 0, len(payload), hashlib.sha256(payload).digest()) + payload


def decode(data: bytes, limit: int) -> dict[str, Any]:
    """The document in ``data``; StateFileError when it is not a whole, valid version-1 file."""
    if len(data) < HEAD_SIZE:
        if not MAGIC.startswith(data[:8]) or not data:
            raise StateFileError("foreign", "not a masqd state file")
        raise StateFileError("truncated", f"truncated: {len(data)} bytes, shorter than its header")
    magic, version, flags, length, digest = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise StateFileError("foreign", "not a masqd state file")
    if version != VERSION or flags:
        raise StateFileError("version", f"format version {version}, this masqd reads version {VERSION}")
    have = len(data) - HEAD_SIZE
    if have != length:
        raise StateFileError("truncated" if have < length else "corrupt",
                             f"{'truncated' if have < length else 'trailing bytes'}: payload {have} bytes, "
                             f"the header says {length}")
    payload = data[HEAD_SIZE:]
    if hashlib.sha256(payload).digest() != digest:
        raise StateFileError("corrupt", "checksum mismatch")
    z = zlib.decompressobj()
    try:
        text = z.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise StateFileError("corrupt", f"cannot inflate: {exc}") from None
    if len(text) > limit or z.unconsumed_tail:
        raise StateFileError("oversized", f"larger than the table limits allow ({limit} bytes)")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StateFileError("corrupt", f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("saved_at"), int | float):
        raise StateFileError("corrupt", "no save time")
    return doc


def write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read(path: str | Path, limit: int) -> dict[str, Any] | None:
    """The document in ``path``; None when there is no file; StateFileError when it is refused."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError("unreadable", f"cannot read: {exc.strerror or exc}") from None
    if size > HEAD_SIZE + limit:
        raise StateFileError("oversized", f"{size} bytes, larger than the table limits allow ({limit} bytes)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise StateFileError("unreadable", f"cannot read: {exc.strerror or exc}") from None
    return decode(data, limit)
