"""The benchmarks' C helpers (bench/pktgen.c, bench/tapfloor.c), compiled once per version of their source.

The binary goes to the temporary directory under a name carrying the hash of the source, so an
edited source is built again and two runs never share a half-written file (built under a
temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def compiled(source: str, *cflags: str) -> str:
    """The path of ``bench/<source>`` compiled with ``cc -O2 <cflags>``, built if not there yet."""
    src = (HERE / source).read_bytes()
    out = Path(tempfile.gettempdir()) / f"masqd-{Path(source).stem}-{hashlib.sha256(src).hexdigest()[:12]}"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}")
        subprocess.run(["cc", "-O2", *cflags, "-o", str(tmp), str(HERE / source)], check=True)
        tmp.replace(out)
    return str(out)
