"""Debian packages as build inputs: resolve a package's candidate, download it, unpack it.

The guest image is built from the machine's own Debian archive (the kernel
from ``linux-image-amd64``, busybox from ``busybox-static``) with the
ordinary tools: ``apt-cache`` to resolve, ``apt-get download`` to fetch a
``.deb`` without installing it, ``dpkg-deb -x`` to unpack it into a
scratch directory. Nothing is installed into the host's ``/boot``.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DebianError",
    "DebianPackage",
    "candidate",
    "download",
    "extract",
    "kernel_from_depends",
    "show",
]

_APT_TIMEOUT_S = 60.0
_DOWNLOAD_TIMEOUT_S = 600.0
_EXTRACT_TIMEOUT_S = 300.0
_APT_UPDATE_HINT = "run `apt-get update` (the package lists may be missing or stale)"


class DebianError(Exception):
    """A Debian package could not be resolved, downloaded or unpacked."""


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}={self.version}"


def _run(argv: list[str], timeout: float, what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise DebianError(f"{what}: {argv[0]} is not installed (this needs a Debian system with apt)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DebianError(f"{what}: `{' '.join(argv)}` did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DebianError(f"{what}: `{' '.join(argv)}` failed: {' / '.join(detail)}")
    return done.stdout


def show(packages: list[str]) -> dict[str, dict[str, str]]:
    """Each package's candidate control fields (the version apt would install), in one apt call.

    One call for all, because each ``apt-cache`` run may rebuild its cache
    (about a second where the binary cache is disabled, as in containers).
    """
    text = _run(
        ["apt-cache", "show", "--no-all-versions", *packages], _APT_TIMEOUT_S, "looking up " + ", ".join(packages)
    )
    found: dict[str, dict[str, str]] = {}
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields.setdefault(key.strip(), value.strip())
        if "Package" in fields and "Version" in fields:
            found.setdefault(fields["Package"], fields)
    missing = [name for name in packages if name not in found]
    if missing:
        raise DebianError(f"apt knows no candidate for {', '.join(missing)}: {_APT_UPDATE_HINT}")
    return found


def candidate(package: str) -> DebianPackage:
    """The version of ``package`` that ``apt-get download`` would fetch."""
    return DebianPackage(package, show([package])[package]["Version"])


def kernel_from_depends(metapackage: str, fields: dict[str, str]) -> DebianPackage:
    """The concrete kernel package (``linux-image-<abi>-amd64``) a kernel metapackage depends on.

    Debian pins it exactly (``linux-image-6.1.0-56-amd64 (= 6.1.192-2)``);
    without a pin, the concrete package's candidate is looked up.
    """
    depends = fields.get("Depends", "")
    for alternative in re.split(r"[,|]", depends):
        match = re.fullmatch(r"\s*(linux-image-\d[\w.+-]*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?\s*", alternative)
        if match and not match.group(1).endswith("-unsigned"):
            name, version = match.group(1), match.group(2)
            return DebianPackage(name, version) if version else candidate(name)
    raise DebianError(f"{metapackage} depends on no concrete kernel package (Depends: {depends!r})")


def download(packages: list[DebianPackage], into: Path) -> dict[str, Path]:
    """Fetch exactly these versions' ``.deb`` files into ``into``; returns name -> file."""
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # As root, apt drops privileges to _apt for downloads, and _apt cannot write
        # into a private scratch directory: download as root instead.
        argv += ["-o", "APT::Sandbox::User=root"]
    argv += [f"{pkg.name}={pkg.version}" for pkg in packages]
    _run(argv, _DOWNLOAD_TIMEOUT_S, "downloading " + ", ".join(map(str, packages)), cwd=into)
    found: dict[str, Path] = {}
    for pkg in packages:
        matches = sorted(into.glob(f"{pkg.name}_*.deb"))
        if not matches:
            raise DebianError(f"apt-get download reported success but left no {pkg.name}_*.deb in {into}")
        found[pkg.name] = matches[0]
    return found


def extract(deb: Path, into: Path) -> Path:
    """Unpack a ``.deb``'s files (not its scripts) under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)], _EXTRACT_TIMEOUT_S, f"unpacking {deb.name}")
    return into
