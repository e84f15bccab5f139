"""Build and cache the User-Mode Linux guest root trees for the interop suite.

Two Debian trees are built with debootstrap (strongSwan and libreswan conflict
in Debian, so each gets its own), both with pppd, pptpd, pptp-linux and the
usual network tools, plus the UML kernel's modules and the guest init files
from ``guest/`` beside this module. Trees live in ``/var/cache/masqd-interop``
and are reused while their stamp (a hash of the image recipe) matches; a
changed recipe rebuilds them (a few minutes: one line per step and how far
it has come, see `Progress`). Guest init files are refreshed on every call
(cheap). scripts/interop-setup runs this module (``python -m
interop.harness.images`` with ``tests/`` on the path).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CACHE_DIR = Path(os.environ.get("MASQD_INTEROP_CACHE", "/var/cache/masqd-interop"))
IMAGE_VERSION = 1
UML_MODULES = Path("/usr/lib/uml/modules")
GUEST_DIR = Path(__file__).with_name("guest")
REPO = Path(__file__).resolve().parents[3]
HOST_PACKAGES = ("user-mode-linux", "debootstrap", "tcpdump", "iproute2", "nftables")
COMMON_PACKAGES = (
    "iproute2",
    "kmod",
    "iputils-ping",
    "procps",
    "ppp",
    "pptpd",
    "pptp-linux",
    "tcpdump",
)
# Guest files: (source: a name in guest/ or a path in the repository, path inside the tree, mode)
GUEST_FILES: tuple[tuple[str | Path, str, int], ...] = (
    ("masqd-guest-init", "sbin/masqd-guest-init", 0o755),
    ("masqd-guest-stage2", "sbin/masqd-guest-stage2", 0o755),
    ("masqd-peer.sh", "usr/local/lib/masqd-peer.sh", 0o644),
    # the SPI announcement client as shipped (issue 22), for the IPsec daemons' updown hooks
    (REPO / "deploy" / "masqd-spi-announce", "usr/local/sbin/masqd-spi-announce", 0o755),
)


@dataclass(frozen=True)
class Image:
    """One guest root tree: its name and the packages on top of the common set."""

    name: str
    extra_packages: tuple[str, ...]

    @property
    def path(self) -> Path:
        return CACHE_DIR / self.name

    @property
    def stamp_path(self) -> Path:
        return CACHE_DIR / f"{self.name}.stamp"

    def packages(self) -> tuple[str, ...]:
        return COMMON_PACKAGES + self.extra_packages


IMAGES: dict[str, Image] = {
    "strongswan": Image(
        "strongswan",
        ("strongswan-charon", "strongswan-swanctl", "libstrongswan-standard-plugins"),
    ),
    "libreswan": Image("libreswan", ("libreswan", "bind9-host")),
}


def uml_kernel_version() -> str:
    """The single module directory name shipped by the user-mode-linux package."""
    versions = sorted(p.name for p in UML_MODULES.iterdir() if p.is_dir())
    if not versions:
        raise RuntimeError(f"no UML kernel modules under {UML_MODULES}")
    return versions[-1]


def stamp_for(image: Image, suite: str) -> str:
    """The recipe hash that identifies a built tree."""
    text = "|".join(
        [str(IMAGE_VERSION), suite, image.name, ",".join(image.packages()), uml_kernel_version()]
    )
    return f"v{IMAGE_VERSION} " + hashlib.sha256(text.encode()).hexdigest()[:16]


def is_current(image: Image, suite: str) -> bool:
    """True when the tree exists and was built from the current recipe."""
    try:
        stamp = image.stamp_path.read_text().strip()
    except OSError:
        return False
    return stamp == stamp_for(image, suite) and (image.path / "sbin").is_dir()


def debian_mirror_and_suite() -> tuple[str, str]:
    """The machine's configured Debian mirror and release codename."""
    suite = "bookworm"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                suite = line.split("=", 1)[1].strip().strip('"') or suite
    except OSError:
        pass
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for src in sources:
        for stanza in src.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and suite in suites.group(1).split():
                return uris.group(1), suite
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                url_idx = 2 if parts[1].startswith("[") else 1
                if parts[url_idx + 1] == suite:
                    return parts[url_idx], suite
    return "http://deb.debian.org/debian", suite


def ensure_host_packages(say: Callable[[str], None] = lambda line: None) -> None:
    """apt-get install the host side (UML kernel, debootstrap, tools) if missing."""
    missing = []
    for pkg in HOST_PACKAGES:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "ok installed" not in res.stdout:
            missing.append(pkg)
    if not missing:
        return
    say(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def install_guest_files(tree: Path) -> None:
    """Copy the guest init files into a tree when they differ."""
    for src_name, rel, mode in GUEST_FILES:
        src = GUEST_DIR / src_name
        dst = tree / rel
        data = src.read_bytes()
        if dst.exists() and dst.read_bytes() == data and (dst.stat().st_mode & 0o777) == mode:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".new")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(dst)


_RETRIEVED = re.compile(r"^I: Retrieving [a-z0-9][a-z0-9+.-]* \S+$")
_INSTALLED = re.compile(r"^I: (Extracting|Unpacking|Configuring) [a-z0-9][a-z0-9+.-]*\.\.\.$")
_DONE = {"Extracting": "extracted", "Unpacking": "unpacked", "Configuring": "configured"}
BUILD_STEPS = 4


class Progress:
    """What one image build says while it runs: a line when a step starts (``[k/4]``) and,
    inside the two long debootstrap steps, how far it has come at most every ``every``
    seconds (packages downloaded; packages extracted, unpacked, configured of all)."""

    def __init__(self, name: str, say: Callable[[str], None], every: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.say = say
        self.every = every
        self.clock = clock
        self.step_no = 0
        self.last = clock()
        self.retrieved = 0
        self.installed: dict[str, int] = {}

    def step(self, no: int, what: str) -> None:
        self.step_no = no
        self.last = self.clock()
        self.say(f"{self.name} [{no}/{BUILD_STEPS}] {what}")

    def debootstrap_line(self, line: str) -> None:
        """Follow debootstrap's ``I:`` lines: downloads (step 1), then installation (step 2)."""
        if _RETRIEVED.match(line):
            self.retrieved += 1
            self._maybe(f"downloaded {self.retrieved} packages")
            return
        m = _INSTALLED.match(line)
        if m is None:
            return
        if self.step_no < 2:
            self.step(2, f"debootstrap: installing {self.retrieved} packages")
        done = _DONE[m.group(1)]
        self.installed[done] = self.installed.get(done, 0) + 1
        counts = ", ".join(f"{self.installed.get(d, 0)} {d}" for d in _DONE.values())
        self._maybe(f"{counts} of {self.retrieved} packages")

    def _maybe(self, how_far: str) -> None:
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.say(f"{self.name} [{self.step_no}/{BUILD_STEPS}] {how_far}")


def _debootstrap(image: Image, mirror: str, suite: str, work: Path, log: Path,
                 progress: Progress) -> int:
    """Run debootstrap into ``work``: its output to ``log``, its progress to ``progress``."""
    progress.step(1, f"debootstrap {suite}: downloading packages")
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(image.packages()),
            suite, str(work), mirror]
    with log.open("w") as out, subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        follow(proc.stdout, out, progress)
    return proc.returncode


def follow(lines: Iterable[str], log: IO[str], progress: Progress) -> None:
    """Copy debootstrap's output to the log file, feeding each line to ``progress``."""
    for line in lines:
        log.write(line)
        progress.debootstrap_line(line.rstrip("\n"))


def build_tree(image: Image, mirror: str, suite: str,
               say: Callable[[str], None] = lambda line: None) -> float:
    """debootstrap one tree into a temporary directory, then move it in place."""
    t0 = time.monotonic()
    progress = Progress(image.name, say)
    work = CACHE_DIR / f"{image.name}.building"
    log = CACHE_DIR / f"{image.name}.debootstrap.log"
    if work.exists():
        shutil.rmtree(work)
    rc = _debootstrap(image, mirror, suite, work, log, progress)
    if rc != 0:
        raise RuntimeError(f"debootstrap of {image.name} failed (rc={rc}), see {log}")
    kver = uml_kernel_version()
    progress.step(3, f"UML kernel modules {kver}")
    mods = work / "lib" / "modules"
    mods.mkdir(parents=True, exist_ok=True)
    shutil.copytree(UML_MODULES / kver, mods / kver, symlinks=True)
    subprocess.run(["chroot", str(work), "depmod", "-a", kver], check=True)
    progress.step(4, "apt clean, guest files, into place")
    subprocess.run(["chroot", str(work), "apt-get", "clean"], check=True)
    install_guest_files(work)
    if image.path.exists():
        shutil.rmtree(image.path)
    work.rename(image.path)
    image.stamp_path.write_text(stamp_for(image, suite) + "\n")
    return time.monotonic() - t0


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_images(names: tuple[str, ...] = tuple(IMAGES), log: bool = True) -> dict[str, Path]:
    """Make sure every named tree exists and is current; return name -> path.

    With ``log``, a build says each step and how far it has come; a warm cache says one line."""

    def say(line: str) -> None:
        if log:
            print(f"interop-setup: {line}", flush=True)

    t0 = time.monotonic()
    ensure_host_packages(say)
    mirror, suite = debian_mirror_and_suite()
    with _cache_lock():
        todo = [IMAGES[n] for n in names if not is_current(IMAGES[n], suite)]
        if todo:
            say(f"building {', '.join(i.name for i in todo)} from {mirror} {suite} "
                f"(a few minutes; logs in {CACHE_DIR})")
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                for image, secs in zip(
                    todo, pool.map(lambda i: build_tree(i, mirror, suite, say), todo), strict=True
                ):
                    say(f"{image.name} built in {secs:.0f}s")
        for n in names:
            install_guest_files(IMAGES[n].path)
    say(f"images ready in {time.monotonic() - t0:.1f}s ({CACHE_DIR})")
    return {n: IMAGES[n].path for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help=f"subset of {', '.join(IMAGES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.images if n not in IMAGES]
    if unknown:
        parser.error(f"unknown image(s) {unknown}; known: {list(IMAGES)}")
    try:
        ensure_images(tuple(args.images) or tuple(IMAGES))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"interop-setup: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
