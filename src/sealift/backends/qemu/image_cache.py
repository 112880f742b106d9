"""The build cache both QEMU guest images share: one directory per input key, built aside and renamed in.

A cache directory holds ``<key>/`` directories (each complete once its
``manifest.json`` exists), a ``current`` file naming the last key built
(the fallback when the inputs cannot be resolved, e.g. offline), and a
``.build.lock``. :func:`cached_build` builds in a scratch directory under
the cache and renames the result into place under an exclusive lock, so
concurrent builders neither race nor leave a half-written image; a new
build keeps the image it replaces and removes older ones.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

__all__ = ["MANIFEST", "cached_build", "exclusive", "last_built"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # written last: a directory with a manifest is a complete image
_CURRENT = "current"

T = TypeVar("T")


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``: one builder per cache directory at a time."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_current(cache_dir: Path, key: str) -> None:
    tmp = cache_dir / f".{_CURRENT}.{os.getpid()}"
    tmp.write_text(key + "\n")
    os.replace(tmp, cache_dir / _CURRENT)


def last_built(cache_dir: Path, load: Callable[[Path], T | None]) -> T | None:
    """The image the ``current`` file names, if it is still complete."""
    try:
        key = (cache_dir / _CURRENT).read_text().strip()
    except OSError:
        return None
    return load(cache_dir / key) if key else None


def _prune(cache_dir: Path, keep: set[str]) -> None:
    """Remove complete image directories other than ``keep`` (each holds a kernel of tens of MB)."""
    for entry in cache_dir.iterdir():
        if entry.is_dir() and entry.name not in keep and (entry / MANIFEST).exists():
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed old guest image %s", entry.name)


def cached_build(
    cache_dir: Path,
    key: str,
    load: Callable[[Path], T | None],
    build: Callable[[Path], Path],
    *,
    force: bool = False,
) -> tuple[T, bool]:
    """The image ``key`` from the cache, or built now by ``build(scratch)``; returns (image, built).

    ``build`` gets an empty scratch directory and returns the directory
    (inside it) that becomes ``cache_dir/key``; it must write ``MANIFEST``
    last. ``load`` reads a complete image directory or returns None.
    Errors of ``build`` pass through unchanged (the scratch is removed).
    """
    image_dir = cache_dir / key
    if not force and (cached := load(image_dir)) is not None:
        return cached, False
    with exclusive(cache_dir / ".build.lock"):
        # Another builder may have finished while we waited for the lock.
        if not force and (cached := load(image_dir)) is not None:
            return cached, False
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_dir) as scratch_name:
            scratch = Path(scratch_name)
            out = build(scratch)
            if image_dir.exists():
                # A forced rebuild: move the old image out of the way inside scratch, which is removed.
                os.rename(image_dir, scratch / "old")
            os.rename(out, image_dir)
        previous = None
        try:
            previous = (cache_dir / _CURRENT).read_text().strip() or None
        except OSError:
            pass
        _write_current(cache_dir, key)
        _prune(cache_dir, {key} | ({previous} if previous else set()))
    image = load(image_dir)
    if image is None:
        raise OSError(f"guest image {key} was built but cannot be read back from {image_dir}")
    return image, True
