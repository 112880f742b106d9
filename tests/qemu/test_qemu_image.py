"""The guest image builder: real Debian packages, real gcc, a cache that is honoured, and a bootable layout."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from qemu_testlib import short_tmpdir
from sealift.backends.qemu import debian
from sealift.backends.qemu.cpio import CpioEntry, write_cpio
from sealift.backends.qemu.image import DEFAULT_SECRET, GuestImagePaths, build_image, default_cache_dir
from sealift.backends.qemu.kmod import _modinfo, module_bytes


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """path -> (mode, content) of a newc archive (the format the kernel unpacks)."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701", f"bad cpio magic at {offset}"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body : body + size])
        offset = body + size + (-size % 4)


def test_cpio_round_trip() -> None:
    out = io.BytesIO()
    write_cpio(
        out,
        [
            CpioEntry.directory("bin"),
            CpioEntry.file("bin/x", b"hello", 0o755),
            CpioEntry.char_device("dev/console", 5, 1),
        ],
    )
    entries = read_cpio(out.getvalue())
    assert entries["bin/x"] == (0o100755, b"hello")
    assert entries["dev/console"][0] == 0o020600
    assert entries["bin"][0] == 0o040755


def test_image_is_built_from_the_candidate_kernel(guest_image: GuestImagePaths) -> None:
    meta = debian.show(["linux-image-amd64"])["linux-image-amd64"]
    assert guest_image.kernel_package in meta["Depends"]
    assert guest_image.kernel_version in meta["Depends"]
    assert guest_image.kernel_release in guest_image.kernel_package
    manifest = json.loads(guest_image.manifest.read_text())
    assert manifest["key"] == guest_image.key
    # The kernel is either the unpacked PVH ELF (fast TCG boots) or the bzImage.
    head = guest_image.kernel.read_bytes()[:4]
    assert head == b"\x7fELF" if guest_image.kernel.name == "vmlinux" else guest_image.kernel.name == "vmlinuz"


def test_initramfs_holds_init_busybox_workload_and_modules_in_load_order(guest_image: GuestImagePaths) -> None:
    entries = read_cpio(guest_image.initramfs.read_bytes())
    for path in ("init", "bin/busybox", "bin/workload"):
        mode, content = entries[path]
        assert mode & 0o111, f"{path} is not executable"
        assert content.startswith((b"#!", b"\x7fELF"))
    assert entries["dev/console"][0] & 0o170000 == 0o020000  # a character device
    assert DEFAULT_SECRET.encode() in entries["bin/workload"][1]  # the workload's default secret

    order = entries["etc/sealift/modules"][1].decode().split()
    assert order == [f"{name}.ko" for name in guest_image.modules]
    assert "virtio_net.ko" in order and "virtio_pci.ko" in order
    # Every module comes after everything its .modinfo says it depends on.
    for position, filename in enumerate(order):
        info = _modinfo(entries[f"lib/modules/{filename}"][1], filename)
        for dep in filter(None, info.get("depends", "").split(",")):
            assert order.index(f"{dep}.ko") < position, f"{filename} is loaded before its dependency {dep}"


def test_workload_is_static(guest_image: GuestImagePaths, tmp_path: Path) -> None:
    workload = tmp_path / "workload"
    workload.write_bytes(read_cpio(guest_image.initramfs.read_bytes())["bin/workload"][1])
    # A static binary has no program interpreter (it must run in an initramfs without libc).
    headers = subprocess.run(["readelf", "-l", str(workload)], capture_output=True, text=True, check=False)
    if headers.returncode == 0:
        assert "INTERP" not in headers.stdout
    else:
        assert b"ld-linux" not in workload.read_bytes()


def test_second_build_uses_the_cache(guest_image: GuestImagePaths) -> None:
    before = guest_image.manifest.stat()
    again = build_image(default_cache_dir())
    after = again.manifest.stat()
    assert again == guest_image
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_concurrent_builds_build_once_and_force_rebuilds(guest_image: GuestImagePaths) -> None:
    cache = short_tmpdir("sl-img-")
    try:
        results: list[GuestImagePaths] = []
        errors: list[BaseException] = []

        def build() -> None:
            try:
                results.append(build_image(cache))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=build) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert results[0] == results[1]
        first = results[0]
        # One image directory, no scratch left behind; same inputs, same bytes.
        assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [first.key]
        assert first.key == guest_image.key
        assert first.initramfs.read_bytes() == guest_image.initramfs.read_bytes()
        assert first.kernel.read_bytes() == guest_image.kernel.read_bytes()

        stamp = first.manifest.stat()
        forced = build_image(cache, force=True)
        assert forced.key == first.key
        # A new manifest (made while the old one still existed, so a different inode).
        assert forced.manifest.stat().st_ino != stamp.st_ino
        assert forced.initramfs.read_bytes() == guest_image.initramfs.read_bytes()
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_module_bytes_rejects_unknown_compression(tmp_path: Path) -> None:
    odd = tmp_path / "x.ko.zst"
    odd.write_bytes(b"whatever")
    with pytest.raises(Exception, match="unsupported module compression"):
        module_bytes(odd)
