"""Build and cache the User-Mode Linux guest root trees for the interop suite.

Two Debian trees are built with debootstrap (strongSwan and libreswan conflict
in Debian, so each gets its own), both with pppd, pptpd, pptp-linux and the
usual network tools, plus the UML kernel's modules and the guest init files
from ``guest/`` beside this module. Trees live in ``/var/cache/masqd-interop``
and are reused while their stamp (a hash of the image recipe) matches; a
changed recipe rebuilds them. Guest init files are refreshed on every call
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("MASQD_INTEROP_CACHE", "/var/cache/masqd-interop"))
IMAGE_VERSION = 1
UML_MODULES = Path("/usr/lib/uml/modules")
GUEST_DIR = Path(__file__).with_name("guest")
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
# Guest files: (source name in guest/, path inside the tree, mode)
GUEST_FILES = (
    ("masqd-guest-init", "sbin/masqd-guest-init", 0o755),
    ("masqd-guest-stage2", "sbin/masqd-guest-stage2", 0o755),
    ("masqd-peer.sh", "usr/local/lib/masqd-peer.sh", 0o644),
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


def ensure_host_packages() -> None:
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


def build_tree(image: Image, mirror: str, suite: str) -> float:
    """debootstrap one tree into a temporary directory, then move it in place."""
    t0 = time.monotonic()
    work = CACHE_DIR / f"{image.name}.building"
    log = CACHE_DIR / f"{image.name}.debootstrap.log"
    if work.exists():
        shutil.rmtree(work)
    with log.open("w") as out:
        res = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(image.packages()),
                suite,
                str(work),
                mirror,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if res.returncode != 0:
        raise RuntimeError(f"debootstrap of {image.name} failed (rc={res.returncode}), see {log}")
    kver = uml_kernel_version()
    mods = work / "lib" / "modules"
    mods.mkdir(parents=True, exist_ok=True)
    shutil.copytree(UML_MODULES / kver, mods / kver, symlinks=True)
    subprocess.run(["chroot", str(work), "depmod", "-a", kver], check=True)
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
    """Make sure every named tree exists and is current; return name -> path."""
    t0 = time.monotonic()
    ensure_host_packages()
    mirror, suite = debian_mirror_and_suite()
    with _cache_lock():
        todo = [IMAGES[n] for n in names if not is_current(IMAGES[n], suite)]
        if todo:
            if log:
                print(f"interop-setup: building {[i.name for i in todo]} from {mirror} {suite}")
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                for image, secs in zip(
                    todo, pool.map(lambda i: build_tree(i, mirror, suite), todo), strict=True
                ):
                    if log:
                        print(f"interop-setup: {image.name} built in {secs:.0f}s")
        for n in names:
            install_guest_files(IMAGES[n].path)
    if log:
        print(f"interop-setup: images ready in {time.monotonic() - t0:.1f}s ({CACHE_DIR})")
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
