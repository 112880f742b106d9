"""The two small documents of a libvirt migration's data stream (sans-IO, every field checked).

`DomainOffer` is the source's first record: the domain (name, UUID) and
the disks the destination must create empty before libvirt copies them.
The destination answers with qemu_stream.Ready: the sessions of the data
streams that will carry libvirt's connections. `StreamKind` is the first
record of each of those streams: which of the destination's sockets to
connect it to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NoReturn

from sealift.wire.errors import ProtocolError

MAX_DISKS = 8
MAX_DOC = 16 * 1024
KINDS = ("control", "memory", "disk")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ID_RE = re.compile(r"[0-9a-f]{8,32}")


@dataclass(frozen=True)
class Disk:
    target: str  # vda
    path: str  # as libvirt sees it, the same on both hosts
    virtual_size: int  # bytes


@dataclass(frozen=True)
class DomainOffer:
    name: str
    uuid: str
    socket_id: str  # the migration's socket directory under socket_dir (the same name on both hosts)
    disks: tuple[Disk, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "uuid": self.uuid,
                "socket_id": self.socket_id,
                "disks": [{"target": d.target, "path": d.path, "virtual_size": d.virtual_size} for d in self.disks],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> DomainOffer:
        raw = _object(data, {"name", "uuid", "socket_id", "disks"})
        name, uuid, socket_id = raw["name"], raw["uuid"], raw["socket_id"]
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            _fail(f"bad domain name {name!r}")
        if not isinstance(uuid, str) or not _UUID_RE.fullmatch(uuid):
            _fail(f"bad domain UUID {uuid!r}")
        if not isinstance(socket_id, str) or not _ID_RE.fullmatch(socket_id):
            _fail(f"bad socket id {socket_id!r}")
        disks = raw["disks"]
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            _fail(f"disks must be a list of at most {MAX_DISKS}")
        parsed = []
        for disk in disks:
            if not isinstance(disk, dict) or set(disk) != {"target", "path", "virtual_size"}:
                _fail(f"bad disk entry {disk!r}")
            target, path, size = disk["target"], disk["path"], disk["virtual_size"]
            if not isinstance(target, str) or not re.fullmatch(r"[a-z]{2,4}[a-z0-9]{0,4}", target):
                _fail(f"bad disk target {target!r}")
            if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
                _fail(f"bad disk path {path!r}")
            if type(size) is not int or not 0 < size <= 1 << 44:
                _fail(f"bad disk size {size!r}")
            parsed.append(Disk(target, path, size))
        return cls(name, uuid, socket_id, tuple(parsed))


def encode_kind(kind: str) -> bytes:
    return json.dumps({"kind": kind}).encode()


def decode_kind(data: bytes) -> str:
    kind = _object(data, {"kind"})["kind"]
    if kind not in KINDS:
        _fail(f"unknown stream kind {kind!r}")
    return str(kind)


def _object(data: bytes, keys: set[str]) -> dict:
    if len(data) > MAX_DOC:
        _fail(f"document of {len(data)} bytes (at most {MAX_DOC})")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"not JSON: {exc}")
    if not isinstance(raw, dict) or set(raw) != keys:
        _fail(f"expected exactly the keys {sorted(keys)}")
    return raw


def _fail(reason: str) -> NoReturn:
    raise ProtocolError(f"libvirt stream document: {reason}")
