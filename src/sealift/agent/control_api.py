"""The agent's local control API: JSON lines on a unix socket (mode 0600).

One request per connection: a JSON object with an "op". Replies are JSON
lines; long operations (migrate) stream {"event": ...} lines before the final
{"ok": true|false, ...} line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from sealift.backends.builtin.registry import BuiltinVmRegistry
from sealift.backends.libvirt.registry import LibvirtRegistry
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.errors import SealiftError
from sealift.host.config import AgentConfig, parse_size
from sealift.host.store import AgentStore
from sealift.migration.authority import Authority
from sealift.migration.options import MigrationOptions
from sealift.migration.report import MigrationReport
from sealift.migration.session import ProgressCallback
from sealift.monitor.service import MonitorService

if TYPE_CHECKING:
    from sealift.backends.qemu.net import NetConfig
    from sealift.wire.vm_definition import VmDefinition

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MAX_REQUEST = 64 * 1024

Emit = Callable[[dict], None]


class RequestError(SealiftError):
    """The request is malformed or names something that does not exist."""

    code = "request_error"


_FALLBACK_CODES = {ValueError: "invalid_argument", PermissionError: "permission_denied", LookupError: "not_found"}


def _kind(exc: BaseException) -> type[Exception]:
    return next(kind for kind in _FALLBACK_CODES if isinstance(exc, kind))


@dataclasses.dataclass(frozen=True)
class MigrateRequest:
    """A `migrate` call, as the control API hands it to the agent (one type for both ends of that call)."""

    vm_name: str
    destination: str
    options: MigrationOptions
    order: str | None  # the signed order document (JSON)
    progress: ProgressCallback | None
    transport: str | None = None  # QEMU guests: a transport by name (None: the default for options.secure)


class ControlledAgent(Protocol):
    """What the control API asks of the agent it serves (agent/daemon.py Agent)."""

    config: AgentConfig
    store: AgentStore
    authority: Authority
    vms: BuiltinVmRegistry
    qemu_vms: QemuVmRegistry
    libvirt_domains: LibvirtRegistry | None  # [libvirt]: this host's libvirt domains
    monitor: MonitorService

    def migrate(self, request: MigrateRequest) -> MigrationReport: ...

    def place(self, vm_name: str) -> dict[str, object]: ...

    def status(self) -> dict[str, object]: ...


class ControlServer:
    def __init__(self, path: Path, agent: ControlledAgent) -> None:
        self._path = path
        self._agent = agent
        self._sock: socket.socket | None = None

    def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: root-only control
        try:
            sock.bind(str(self._path))
        finally:
            os.umask(old_umask)
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="control-api", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            stream = conn.makefile("rwb")

            def emit(obj: dict) -> None:
                stream.write(json.dumps(obj).encode() + b"\n")
                stream.flush()

            op = "?"
            try:
                line = stream.readline(MAX_REQUEST + 1)
                if len(line) > MAX_REQUEST:
                    raise RequestError("request too large")
                request = json.loads(line or b"{}")
                if not isinstance(request, dict):
                    raise RequestError("request must be a JSON object")
                op = str(request.get("op"))
                emit({"ok": True, **self._dispatch(request, emit)})
            except SealiftError as exc:  # every refusal says why, for people and for scripts
                log.warning("control %s refused (%s): %s", op, exc.code, exc)  # expected: one line, no traceback
                _safe(emit, {"ok": False, "error": str(exc), "code": exc.code})
            except (ValueError, PermissionError, LookupError) as exc:
                code = _FALLBACK_CODES[_kind(exc)]
                log.warning("control %s refused (%s): %s", op, code, exc)
                _safe(emit, {"ok": False, "error": str(exc), "code": code})
            except Exception as exc:  # a bug: its traceback, and never kill the agent
                log.exception("control %s failed unexpectedly", op)
                _safe(emit, {"ok": False, "error": str(exc) or type(exc).__name__, "code": "internal_error"})

    def _dispatch(self, request: dict, emit: Emit) -> dict:
        op = request.get("op")
        handler = getattr(self, "_op_" + str(op).replace(".", "_"), None)
        if handler is None:
            raise RequestError(f"unknown operation {op!r}")
        return handler(request, emit)

    # -- operations ---------------------------------------------------------

    def _op_status(self, request: dict, emit: Emit) -> dict:
        return {"status": self._agent.status()}

    def _op_vm_start(self, request: dict, emit: Emit) -> dict:
        name = _field(request, "name", str)
        backend = request.get("backend", "builtin")
        if backend not in ("builtin", "qemu"):
            raise RequestError(f"unknown backend {backend!r}: use builtin or qemu")
        if backend == "qemu":
            if self._agent.vms.has(name):
                raise RequestError(f"a built-in VM named {name!r} already runs here")
            image_cache = request.get("image_cache")
            qemu_vm = self._agent.qemu_vms.start(
                name,
                parse_size(request.get("memory", "256M")) >> 20,
                extra_cmdline=str(request.get("cmdline", "")),
                net=_net_config(request.get("net")),
                image_cache=Path(image_cache) if isinstance(image_cache, str) else None,
                definition=_vm_definition(request),
                guest=str(request.get("guest", "sealift")),
            )
            return {"vm": self._agent.qemu_vms.info(qemu_vm.name)}
        if self._agent.qemu_vms.has(name):
            raise RequestError(f"a QEMU VM named {name!r} already runs here")
        vm = self._agent.vms.start(
            name=name,
            memory_bytes=parse_size(request.get("memory", "256M")),
            workload=str(request.get("workload", "db")),
            fill_fraction=float(request.get("fill_fraction", 0.5)),
        )
        return {"vm": self._agent.vms.info(vm.name)}

    def _op_vm_list(self, request: dict, emit: Emit) -> dict:
        domains = self._agent.libvirt_domains
        libvirt = [_with_boot(vm) for vm in domains.list()] if domains else []
        return {"vms": self._agent.vms.list() + self._agent.qemu_vms.list() + libvirt}

    def _op_vm_info(self, request: dict, emit: Emit) -> dict:
        name = _field(request, "name", str)
        if self._agent.qemu_vms.has(name):
            return {"vm": self._agent.qemu_vms.info(name)}
        domains = self._agent.libvirt_domains
        if domains is not None and not self._agent.vms.has(name) and domains.has(name):
            return {"vm": _with_boot(domains.info(name))}
        return {"vm": self._agent.vms.info(name)}

    def _op_vm_console(self, request: dict, emit: Emit) -> dict:
        name = _field(request, "name", str)
        return {"lines": self._agent.qemu_vms.console(name, int(request.get("lines", 20)))}

    def _op_vm_check(self, request: dict, emit: Emit) -> dict:
        check = self._agent.vms.check(_field(request, "name", str))
        return {
            "check": {
                "pages_checked": check.pages_checked,
                "bad_page_count": check.bad_page_count,
                "bad_pages": list(check.bad_pages),
                "secret_intact": check.secret_intact,
            }
        }

    def _op_vm_stop(self, request: dict, emit: Emit) -> dict:
        name = _field(request, "name", str)
        domains = self._agent.libvirt_domains
        if self._agent.qemu_vms.has(name):
            self._agent.qemu_vms.stop(name)
        elif domains is not None and not self._agent.vms.has(name) and domains.has(name):
            domains.stop(name)
        else:
            self._agent.vms.stop(name)
        return {"stopped": name}

    def _op_migrations(self, request: dict, emit: Emit) -> dict:
        records = self._agent.store.migrations(limit=int(request.get("limit", 50)))
        return {
            "migrations": [
                {
                    "id": r.id,
                    "vm": r.vm,
                    "role": r.role,
                    "peer": r.peer,
                    "phase": r.phase,
                    "decision": r.decision,
                    "created_at": r.created_at,
                    "error": r.error,
                }
                for r in records
            ]
        }

    def _op_migration(self, request: dict, emit: Emit) -> dict:
        """One migration's record with the report it saved (the source saves one); the id may be shortened."""
        prefix = _field(request, "id", str)
        if len(prefix) < 4:
            raise RequestError("give at least 4 characters of the migration id")
        records = self._agent.store.migrations_by_prefix(prefix, limit=2)
        if not records:
            raise LookupError(f"no migration {prefix!r} on {self._agent.config.name}")
        if len(records) > 1:
            raise RequestError(f"migration id {prefix!r} matches several migrations: give more of it")
        return {"migration": dataclasses.asdict(records[0])}

    def _op_migrate(self, request: dict, emit: Emit) -> dict:
        overrides = request.get("options", {})
        if not isinstance(overrides, dict):
            raise RequestError("options must be an object")
        base = self._agent.config.migration.to_dict()
        transport = overrides.get("transport")
        if transport is not None and not isinstance(transport, str):
            raise RequestError("transport must be a string")
        options = MigrationOptions.from_dict({**base, **overrides})
        order = request.get("order")
        if order is not None and not isinstance(order, str):
            raise RequestError("order must be the signed order document (a JSON string)")
        report = self._agent.migrate(
            MigrateRequest(
                _field(request, "vm", str),
                _field(request, "to", str),
                options,
                order=order,
                progress=lambda event: _safe(emit, {"event": event.kind, **event.data}),
                transport=transport,
            )
        )
        return {"report": report.to_dict()}

    def _op_place(self, request: dict, emit: Emit) -> dict:
        return {"placement": self._agent.place(_field(request, "vm", str))}

    def _op_psk_provision(self, request: dict, emit: Emit) -> dict:
        from sealift.security.psk import psk_from_hex

        peer = _field(request, "peer", str)
        fingerprint = self._agent.authority.provision_psk(peer, psk_from_hex(_field(request, "key", str)))
        return {"peer": peer, "fingerprint": fingerprint}

    def _op_psk_status(self, request: dict, emit: Emit) -> dict:
        store = self._agent.authority.psk
        return {"peers": [dataclasses.asdict(store.status(peer)) for peer in store.peers()]}

    def _op_audit_show(self, request: dict, emit: Emit) -> dict:
        entries = self._agent.authority.audit.show(limit=int(request.get("limit", 50)), kind=request.get("kind"))
        return {"entries": [entry.to_dict() for entry in entries]}

    def _op_audit_verify(self, request: dict, emit: Emit) -> dict:
        result = self._agent.authority.audit.verify()
        return {
            "verification": {
                "ok": result.ok,
                "entries": result.entries,
                "head_seq": result.head_seq,
                "problems": [{"seq": p.seq, "what": p.what} for p in result.problems],
            }
        }

    # -- monitors (sealift.monitor) -------------------------------------------

    def _op_monitor_snapshot(self, request: dict, emit: Emit) -> dict:
        return {"monitor": self._agent.monitor.snapshot()}

    def _op_monitor_flag(self, request: dict, emit: Emit) -> dict:
        vm, kind = _field(request, "vm", str), _field(request, "kind", str)
        return {"verdict": self._agent.monitor.flag(vm, kind, str(request.get("reason", "no reason given")))}

    def _op_monitor_unflag(self, request: dict, emit: Emit) -> dict:
        return {"cleared": self._agent.monitor.unflag(_field(request, "vm", str))}

    def _op_vm_workload(self, request: dict, emit: Emit) -> dict:
        """Attack lab: give a guest another workload profile (backends/workload_switch.py).

        Built-in: the guest restarts with the profile. QEMU: the running guest's
        workload is told over its control channel (no restart); profile "flood"
        takes target "A.B.C.D:PORT" and optional pps, seconds, size.
        """
        from sealift.backends.workload_switch import switch_workload

        name, profile = _field(request, "name", str), _field(request, "profile", str)
        if self._agent.qemu_vms.has(name):
            return self._qemu_workload(name, profile, request)
        self._agent.monitor.expect_restart(name)
        vm = switch_workload(self._agent.vms, name, profile)
        self._agent.authority.record("vm.workload", vm=name, profile=profile, pid=vm["pid"])
        return {"vm": vm}

    def _qemu_workload(self, name: str, profile: str, request: dict) -> dict:
        from sealift.backends.qemu.guest_control import GuestControlError
        from sealift.backends.qemu.registry import QemuVmError
        from sealift.backends.workload_switch import FloodRequest, drive_qemu_guest

        flood = None
        if profile == "flood" or request.get("target") is not None:
            flood = FloodRequest.parse(
                request.get("target"), request.get("pps"), request.get("seconds"), request.get("size")
            )
        try:
            state = drive_qemu_guest(self._agent.qemu_vms, name, profile, flood)
        except (QemuVmError, GuestControlError) as exc:
            raise RequestError(f"cannot drive QEMU guest {name}'s workload: {exc}") from None
        vm = self._agent.qemu_vms.info(name)
        vm.update(profile=profile, previous_pid=vm["pid"], guest=state.to_dict())
        fields = (
            {
                "target": f"{flood.target[0]}:{flood.target[1]}",
                "pps": flood.pps,
                "seconds": flood.seconds,
                "size": flood.size,
            }
            if flood
            else {}
        )
        self._agent.authority.record("vm.workload", vm=name, profile=profile, pid=vm["pid"], backend="qemu", **fields)
        return {"vm": vm}


def _net_config(value: object) -> NetConfig | None:
    """A QEMU guest's network from the request: {"mode": "tap", "tap": ..., "guest_ip": ..., "gateway": ...}.

    Absent: the registry's default (user networking). A tap must already exist
    on its bridge (the lab makes one per guest on every host).
    """
    from sealift.backends.qemu.net import NetConfig, NetError

    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError('net must be an object such as {"mode": "tap", "tap": "tap0", "guest_ip": "10.0.0.5/24"}')
    try:
        return NetConfig.from_json(value).validated()
    except NetError as exc:
        raise RequestError(str(exc)) from None


def _with_boot(info: dict) -> dict:
    """A libvirt domain's entry with the QEMU entry's ``boot`` key (null: libvirt does not report it yet).

    Every backend's entry has the same keys (docs/schemas/common.schema.json, vm).
    """
    info.setdefault("boot", None)
    return info


def _vm_definition(request: dict) -> VmDefinition | None:
    """A QEMU guest's vCPUs, disks and boot: {"cpus": 2, "disks": ["/a.qcow2", "/b.raw,shared"],
    "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img"} (kernel and initrd go together), or
    "boot": "disk" (the firmware boots disk 0) with an optional "firmware": "/path/bios.bin"."""
    from sealift.backends.qemu.definition import DEFAULT_FIRMWARE, DiskError, definition_for, parse_disk_option
    from sealift.wire.vm_definition import BootSpec, FirmwareBoot

    cpus, disks = request.get("cpus", 1), request.get("disks", [])
    kernel, initrd = request.get("kernel"), request.get("initrd")
    boot_from, firmware = request.get("boot"), request.get("firmware")
    boot: BootSpec | FirmwareBoot | None = None
    if boot_from not in (None, "kernel", "disk"):
        raise RequestError(f"boot must be 'kernel' or 'disk', not {boot_from!r}")
    if boot_from == "disk":
        if kernel is not None or initrd is not None or request.get("cmdline"):
            # The guest's command line is its boot loader's, on the disk: one given here would be lost.
            raise RequestError(
                "boot 'disk' boots the first disk through the firmware: leave out kernel, initrd and cmdline"
            )
        if firmware is not None and not isinstance(firmware, str):
            raise RequestError("firmware must be a path")
        boot = FirmwareBoot(firmware or DEFAULT_FIRMWARE)
    elif firmware is not None:
        raise RequestError("firmware goes with boot 'disk'")
    elif kernel is not None or initrd is not None:
        if not isinstance(kernel, str) or not isinstance(initrd, str):
            raise RequestError("an own kernel needs both kernel and initrd (paths)")
        boot = BootSpec(kernel, initrd)
    if type(cpus) is not int:
        raise RequestError("cpus must be an integer")
    if not isinstance(disks, list) or not all(isinstance(disk, str) for disk in disks):
        raise RequestError('disks must be a list of "PATH" or "PATH,shared"')
    try:
        return definition_for(cpus, [parse_disk_option(disk) for disk in disks], boot)
    except DiskError as exc:
        raise RequestError(str(exc)) from None


def _field(request: dict, key: str, kind: type[_T]) -> _T:
    value = request.get(key)
    if not isinstance(value, kind):
        raise RequestError(f"request needs '{key}' ({kind.__name__})")
    return value


def _safe(emit: Emit, obj: dict) -> None:
    """The client may have gone away; the operation must go on regardless."""
    try:
        emit(obj)
    except OSError:
        pass
