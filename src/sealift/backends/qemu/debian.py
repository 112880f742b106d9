"""Debian packages as build inputs: resolve a package's candidate, download it, unpack it.

The guest image is built from the machine's own Debian archive (the kernel
from ``linux-image-amd64``, busybox from ``busybox-static``) with the
ordinary tools: ``apt-cache`` to resolve, ``apt-get download`` to fetch a
``.deb`` without installing it, ``dpkg-deb -x`` to unpack it into a
scratch directory. Nothing is installed into the host's ``/boot``.
"""

from __future__ import annotations

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
    "kernel_for_metapackage",
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


def _show(package: str) -> dict[str, str]:
    """The candidate version's control fields (the version apt would install)."""
    text = _run(["apt-cache", "show", "--no-all-versions", package], _APT_TIMEOUT_S, f"looking up {package}")
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line[0].isspace() or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields.setdefault(key.strip(), value.strip())
    if "Version" not in fields:
        raise DebianError(f"apt knows no candidate for {package}: {_APT_UPDATE_HINT}")
    return fields


def candidate(package: str) -> DebianPackage:
    """The version of ``package`` that ``apt-get download`` would fetch."""
    return DebianPackage(package, _show(package)["Version"])


def kernel_for_metapackage(metapackage: str = "linux-image-amd64") -> DebianPackage:
    """The concrete kernel package (``linux-image-<abi>-amd64``) the metapackage depends on."""
    depends = _show(metapackage).get("Depends", "")
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(r"linux-image-\d[\w.+-]*", name) and not name.endswith("-unsigned"):
            return candidate(name)
    raise DebianError(f"{metapackage} depends on no concrete kernel package (Depends: {depends!r})")


def download(packages: list[DebianPackage], into: Path) -> dict[str, Path]:
    """Fetch exactly these versions' ``.deb`` files into ``into``; returns name -> file."""
    # As root, apt drops privileges to _apt for downloads, which cannot write into
    # a private scratch directory: download as the calling user instead.
    argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"]
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
