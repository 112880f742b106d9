"""QEMU migrating straight to the destination QEMU over TCP, and QEMU's native TLS for that path.

The agents still authorise and settle every migration over their own
channel (orders, policy, signed manifest and receipts); on this path only
QEMU's stream takes another road: QEMU's own TCP transport, from the source
QEMU to the destination QEMU. A transport built on it is a list of hooks run
on each QEMU before the stream starts (install TLS credentials, set up a
tunnel) and another run after it ended, whatever happened (remove them):

    port = listen_direct(destination_vm, listen_host, before=[tls.install])
    start_direct(source_vm, (host, port), before=[tls.install])
    ...
    run_after_hooks(vm, [tls.remove])

`QemuTls` is the hook pair of the ``qemu-tls`` transport: x509 credentials
(the host's own certificate and key, and the cluster CA) written into a
private directory in the layout ``tls-creds-x509`` reads, loaded by QEMU at
``object-add``, and deleted at once. Both ends verify the peer: the source
QEMU checks the destination's certificate against the cluster CA and the
destination host name (``tls-hostname``, the certificate's SAN DNS name);
the destination QEMU checks the source's certificate against the same CA and
admits only the source host's subject (``tls-authz``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sealift.backends.qemu.vm import QemuError, QemuVM

log = logging.getLogger(__name__)

Hook = Callable[[QemuVM], None]
Endpoint = Literal["server", "client"]

TLS_CREDS_ID = "sealift-mig-tls-"
TLS_AUTHZ_ID = "sealift-mig-authz-"


def tcp_uri(host: str, port: int) -> str:
    """QEMU's migration URI for a TCP address (an IPv6 literal goes in brackets)."""
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def listen_direct(vm: QemuVM, host: str, before: Iterable[Hook] = ()) -> int:
    """Destination: run the hooks, let QEMU (started with incoming="defer") listen on ``host``; its port.

    ``host`` is a concrete local address (the agent's own listen address),
    never a wildcard: the migration port must not be open on every network.
    """
    if host in ("", "0.0.0.0", "::"):
        raise QemuError(f"refusing to let the incoming QEMU listen on the wildcard address {host!r}")
    for hook in before:
        hook(vm)
    vm.migrate_incoming(tcp_uri(host, 0))  # port 0: the kernel picks a free one, QEMU reports it
    return incoming_port(vm)


def incoming_port(vm: QemuVM) -> int:
    """The TCP port a destination QEMU listens on for its incoming migration."""
    for address in vm.query_migrate().get("socket-address", []):
        if address.get("type") == "inet" and str(address.get("port", "")).isdigit():
            return int(address["port"])
    raise QemuError(f"VM {vm.name}: QEMU reports no TCP listening address for the incoming migration")


def start_direct(vm: QemuVM, address: tuple[str, int], before: Iterable[Hook] = ()) -> None:
    """Source: run the hooks, then start QEMU's migration to the destination QEMU at ``address``."""
    for hook in before:
        hook(vm)
    vm.migrate(tcp_uri(*address))


def run_after_hooks(vm: QemuVM, after: Iterable[Hook]) -> None:
    """Clean-up hooks: each runs even if an earlier one failed; failures are logged, never raised."""
    for hook in after:
        try:
            hook(vm)
        except Exception as exc:  # noqa: BLE001 - clean-up must not hide the migration's own outcome
            log.warning("VM %s: clean-up after the migration failed: %s", vm.name, exc)


# -- QEMU's native TLS -------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of one end's credentials: the trust anchor, its certificate and its key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, ca_path: Path, cert_path: Path, key_path: Path) -> TlsMaterial:
        try:
            return cls(ca_path.read_bytes(), cert_path.read_bytes(), key_path.read_bytes())
        except OSError as exc:
            raise QemuError(f"cannot read the TLS credentials for QEMU: {exc}") from exc


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class QemuTls:
    """QEMU's native TLS on one end of one migration: ``install`` before, ``remove`` after."""

    def __init__(self, material: TlsMaterial, endpoint: Endpoint, peer_host: str, tag: str = "") -> None:
        self._material = material
        self._endpoint = endpoint
        # Server: the one client subject admitted. Client: the name the server's certificate must carry.
        self._peer_host = peer_host
        # Object ids per migration: a leftover object (a failed clean-up) never blocks the next attempt.
        self._creds_id = f"{TLS_CREDS_ID}{tag}"
        self._authz_id = f"{TLS_AUTHZ_ID}{tag}"

    def install(self, vm: QemuVM) -> None:
        directory = Path(tempfile.mkdtemp(prefix="sl-qtls-", dir="/tmp"))  # mode 0700
        try:
            _write_private(directory / "ca-cert.pem", self._material.ca_pem)
            _write_private(directory / f"{self._endpoint}-cert.pem", self._material.cert_pem)
            _write_private(directory / f"{self._endpoint}-key.pem", self._material.key_pem)
            parameters: dict[str, str] = {"tls-creds": self._creds_id}
            if self._endpoint == "server":
                # A host certificate's subject is exactly CN=<host> (security/identity.py).
                vm.qmp(
                    "object-add",
                    {"qom-type": "authz-simple", "id": self._authz_id, "identity": f"CN={self._peer_host}"},
                )
                parameters["tls-authz"] = self._authz_id
            else:
                parameters["tls-hostname"] = self._peer_host
            vm.qmp(
                "object-add",
                {
                    "qom-type": "tls-creds-x509",
                    "id": self._creds_id,
                    "dir": str(directory),
                    "endpoint": self._endpoint,
                    "verify-peer": True,
                },
            )
            vm.set_migration_parameters(parameters)
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # QEMU read the files at object-add

    def remove(self, vm: QemuVM) -> None:
        if not vm.alive():
            return
        errors: list[str] = []
        try:
            vm.set_migration_parameters({"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
        except QemuError as exc:
            errors.append(str(exc))
        for object_id in (self._creds_id, self._authz_id):
            try:
                vm.qmp("object-del", {"id": object_id})
            except QemuError as exc:
                if "not found" not in str(exc):
                    errors.append(str(exc))
        if errors:
            raise QemuError("; ".join(errors))
