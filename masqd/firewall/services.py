"""Service names -> port numbers, as ``getservbyname(3)`` answered ipchains and ipfwadm.

The tools of that era resolved a port word such as ``finger`` or ``pop-3``
through the system's services database, per protocol (``getservbyname(name,
"tcp")``). masqd reads the host's ``/etc/services`` (services(5) format) when
there is one, and otherwise a built-in table generated from Debian netbase's
services file and the IANA service name registry (``services.txt`` beside this
module, made by ``scripts/gen-services-table``), e.g. inside a minimal
container image. As in
the C library, names and aliases are case sensitive and the first line that
names a (name, protocol) pair wins.
"""

from __future__ import annotations

import functools
from importlib import resources

HOST_FILE = "/etc/services"
BUILTIN_FILE = "services.txt"
MAX_FILE = 4 * 1024 * 1024  # a services file larger than this is not one


class Services:
    """A services database: ``port(name, proto)`` with proto ``"tcp"`` or ``"udp"``."""

    def __init__(self, ports: dict[tuple[str, str], int], source: str) -> None:
        self.ports = ports
        self.source = source

    @classmethod
    def from_text(cls, text: str, source: str) -> Services:
        """Parse services(5) lines ``name port/proto[/proto...] [alias...] [# comment]``; bad lines are skipped."""
        ports: dict[tuple[str, str], int] = {}
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            num, _, protos = words[1].partition("/")
            if not num.isdigit() or int(num) > 65535 or not protos:
                continue
            for proto in protos.split("/"):
                for name in (words[0], *words[2:]):
                    ports.setdefault((name, proto), int(num))
        return cls(ports, source)

    @classmethod
    def builtin(cls) -> Services:
        """The table kept in the package."""
        text = resources.files(__package__).joinpath(BUILTIN_FILE).read_text(encoding="utf-8")
        source = next((ln[len("# source: "):] for ln in text.splitlines()[:8] if ln.startswith("# source: ")), "?")
        return cls.from_text(text, f"built-in table ({source})")

    def port(self, name: str, proto: str) -> int | None:
        return self.ports.get((name, proto))


def load(path: str = HOST_FILE) -> Services:
    """The services file at ``path`` when it can be read as one, else the built-in table."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError:
        return Services.builtin()
    if len(data) > MAX_FILE:
        return Services.builtin()
    db = Services.from_text(data.decode("utf-8", "replace"), path)
    return db if db.ports else Services.builtin()


@functools.cache
def system() -> Services:
    """The host's database (read once per process), or the built-in table."""
    return load()
