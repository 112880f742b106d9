"""The destination side of a migration.

The destination checks before it accepts (is the Hello for this host, from
the host that authenticated, can we hold the VM?), receives into a fresh
image, verifies the image and device state against the source's signed
manifest, and promises ("prepared") only after that is on disk. It starts the
guest only on Commit. A tampered record, a digest mismatch, a dead peer or a
timeout before Commit discards the image: the source still has the VM.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from pathlib import Path

from sealift.agent.config import AgentConfig
from sealift.migration.authority import Authority
from sealift.migration.documents import DocumentError, DocumentSigner, channel_binding
from sealift.monitor import gate as monitor_gate
from sealift.security.audit import Kinds
from sealift.security.errors import SecurityError
from sealift.security.orders import VerifiedOrder
from sealift.security.psk import PskSession, psk_channel_binding
from sealift.agent.store import AgentStore
from sealift.agent.transport import ControlChannel, DataSessions, recv_exactly_into
from sealift.backends.builtin.registry import AdmissionError, VmRegistry
from sealift.backends.builtin.image import GuestImage
from sealift.backends.builtin.vm import StandbyGuest
from sealift.backends.builtin.receiver import ImageReceiver, ReceiveResult
from sealift.backends.builtin.sender import state_digest
from sealift.security.identity import HostIdentity
from sealift.security.keys import channel_secret, derive_session_keys
from sealift.wire.datastream import DataStreamReader
from sealift.wire.messages import Abort, Accept, Commit, Hello, Manifest, Receipt, Refuse
from sealift.wire.records import AeadProtection, NoProtection, RecordProtection

log = logging.getLogger(__name__)


class IncomingRefused(Exception):
    """We will not take this VM; the reason goes back to the source."""


class DestinationCoordinator:
    """What every backend's destination does the same way: admit or refuse, accept, promise, await Commit.

    A backend supplies its own steps: `_admit` (checks and reservations
    before saying yes), `_prepare` (before Accept), `_take_stream` (receive
    and verify against the signed manifest), `_start_guest`, `_discard`,
    `_hold_in_doubt` and `_release` (always, at the end).
    """

    KIND = ""  # how logs name this backend's migrations ("QEMU " for QEMU guests)
    ACCEPT_AUDIT: dict[str, object] = {}

    def __init__(self, config: AgentConfig, identity: HostIdentity | None, store: AgentStore, vms: VmRegistry,
                 sessions: DataSessions, channel: ControlChannel, hello: Hello, authority: Authority) -> None:  # fmt: skip
        self._config = config
        self._authority = authority
        self._store = store
        self._vms = vms
        self._sessions = sessions
        self._channel = channel
        self._hello = hello
        self._signer = DocumentSigner(config.name, identity if channel.secure else None)
        self._session_id = secrets.token_bytes(16)
        self._binding: str | None = None
        self._order_id: str | None = None
        self._psk: PskSession | None = None  # the pair's second factor, when a PSK is provisioned
        self._psk_binding = b""
        self._nonce = secrets.token_bytes(32)

    def _audit(self, kind: str, **fields: object) -> None:
        self._authority.record(kind, migration_id=self._hello.migration_id, **fields)

    def run(self) -> None:
        hello = self._hello
        try:
            self._admit()
        except (IncomingRefused, AdmissionError, SecurityError) as exc:
            self._refuse(exc)
            return
        cpu_started = time.process_time()
        prepared = False
        try:
            self._store.create_migration(hello.migration_id, hello.vm_name, "destination", hello.source_host, "receiving",
                                         hello.memory_bytes)  # fmt: skip
            self._prepare()
            self._accept()
            manifest = self._take_stream()
            self._store.set_phase(hello.migration_id, "prepared")  # durable before we promise
            prepared = True
            receipt = self._receipt(manifest, "prepared")
            self._audit(Kinds.RECEIPT, stage="prepared", receipt=receipt)
            self._channel.send(Receipt(hello.migration_id, "prepared", receipt))
            self._await_commit()
            self._lab_pause("commit-received")
            self._start_guest(manifest, cpu_started)
        except Exception as exc:
            if prepared:
                self._hold_in_doubt(exc)  # the source may have committed: keep what we have and ask it
            else:
                self._discard(str(exc))
        finally:
            if self._psk is not None:
                self._psk.close()  # an uncommitted ratchet stays pending: never a lock-out
            self._sessions.finish(self._session_id)
            self._release(prepared)

    def _refuse(self, exc: BaseException) -> None:
        hello = self._hello
        log.warning("refused %smigration %s of %s from %s: %s", self.KIND, hello.migration_id, hello.vm_name,
                    hello.source_host, exc)  # fmt: skip
        self._audit("migration.refused", vm=hello.vm_name, source=hello.source_host, reason=str(exc))
        if self._psk is not None:
            self._psk.close()
        self._channel.send(Refuse(hello.migration_id, str(exc)[:1000]))

    def _accept(self) -> None:
        hello = self._hello
        self._sessions.expect(self._session_id)
        self._binding = channel_binding(self._channel, hello.nonce, self._nonce, hello.migration_id)
        psk_proof = None
        if self._psk is not None:
            psk_proof = self._psk.make_proof(self._psk_binding, hello.nonce, self._nonce)
        self._channel.send(Accept(hello.migration_id, self._nonce, self._session_id, psk_proof))
        self._audit("migration.accepted", vm=hello.vm_name, source=hello.source_host, **self.ACCEPT_AUDIT,
                    memory_bytes=hello.memory_bytes)  # fmt: skip

    def _receipt(self, manifest: dict, stage: str, **extra: object) -> str:
        payload = {
            "migration_id": self._hello.migration_id,
            "vm": self._hello.vm_name,
            "source": self._hello.source_host,
            "destination": self._config.name,
            "image_digest": manifest.get("image_digest"),
            "state_digest": manifest.get("state_digest"),
            "stage": stage,
            "channel_binding": self._binding,
            "signed_at": time.time(),
            **extra,
        }
        return self._signer.sign(payload, "receipt")

    def _await_commit(self) -> None:
        reply = self._channel.recv(self._config.step_timeout_s)
        if isinstance(reply, Abort):
            raise IncomingRefused(f"the source aborted: {reply.reason}")
        assert isinstance(reply, Commit)
        # Only now does this host know the source checked our Accept and holds the new key.
        if self._psk is not None:
            try:
                if self._psk.commit():
                    self._audit(Kinds.KEY_CHANGED, what="psk ratcheted", peer=self._hello.source_host,
                                epoch=self._psk.epoch)  # fmt: skip
            except SecurityError as exc:  # the handover matters more than this session's ratchet
                log.error("PSK ratchet with %s not committed: %s", self._hello.source_host, exc)

    def _send_running_receipt(self, receipt: str) -> None:
        try:
            self._channel.send(Receipt(self._hello.migration_id, "running", receipt))
        except OSError as exc:
            # The guest runs here and the source has committed: it will learn by asking.
            log.warning("could not send the running receipt for %s: %s", self._hello.migration_id, exc)

    def _record_abort(self, reason: str) -> None:
        """The failure on record (store, audit) and told to the source, whatever state either is in."""
        hello = self._hello
        try:
            self._store.set_phase(hello.migration_id, "aborted", error=reason)
        except Exception:  # noqa: BLE001 - recording must not stop the abort
            log.exception("could not record the abort of %s", hello.migration_id)
        self._audit("migration.aborted", vm=hello.vm_name, source=hello.source_host, reason=reason)
        try:
            self._channel.send(Abort(hello.migration_id, reason[:1000]))
        except Exception:  # noqa: BLE001 - the conversation may already be over or the peer gone
            pass

    def _lab_pause(self, point: str) -> None:
        """Tests and the attack lab only: hold at a named point (config.LAB_PAUSE_POINTS)."""
        if self._config.lab_pause_at == point:
            log.warning("lab: migration %s paused at %s", self._hello.migration_id, point)
            time.sleep(self._config.lab_pause_s)

    # -- the backend's steps ---------------------------------------------------------

    def _admit(self) -> None:
        raise NotImplementedError

    def _prepare(self) -> None:
        """What must hold before Accept (nothing by default)."""

    def _take_stream(self) -> dict:
        raise NotImplementedError

    def _start_guest(self, manifest: dict, cpu_started: float) -> None:
        raise NotImplementedError

    def _discard(self, reason: str) -> None:
        raise NotImplementedError

    def _hold_in_doubt(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _release(self, prepared: bool) -> None:
        """Always, at the end (nothing by default)."""


class IncomingMigration(DestinationCoordinator):
    """A built-in guest: received into a fresh image, started from a standby process on Commit."""

    def __init__(
        self,
        config: AgentConfig,
        identity: HostIdentity | None,
        store: AgentStore,
        vms: VmRegistry,
        sessions: DataSessions,
        channel: ControlChannel,
        hello: Hello,
        authority: Authority,
    ) -> None:
        super().__init__(config, identity, store, vms, sessions, channel, hello, authority)
        self._image: GuestImage | None = None
        self._created_image = False  # only an image this migration created may be discarded by it
        self._standby: StandbyGuest | None = None

    @property
    def image_path(self) -> Path:
        return self._config.vm_dir / f"{self._hello.vm_name}.img"

    def _prepare(self) -> None:
        self._image = GuestImage.create_empty(self.image_path, self._hello.memory_bytes)
        self._created_image = True
        self._image.reserve()  # the memory is ours before we say yes
        self._standby = StandbyGuest(self._config.vm_dir, self._hello.vm_name)  # off the downtime path

    def _take_stream(self) -> dict:
        assert self._image is not None
        result = self._receive()
        manifest = self._verify_manifest(result)
        self._image.write_state(result.device_state or b"")
        return manifest

    def _hold_in_doubt(self, exc: BaseException) -> None:
        hello = self._hello
        log.warning("migration %s in doubt after prepare (%s); asking %s", hello.migration_id, exc, hello.source_host)
        self._store.set_phase(hello.migration_id, "prepared", error=str(exc))

    def _release(self, prepared: bool) -> None:
        if self._standby is not None:  # never handed over (in doubt or failed)
            self._standby.cancel()
            self._standby = None
        if not prepared:
            self._vms.unreserve_incoming(self._hello.migration_id, self._hello.vm_name)

    # -- steps ----------------------------------------------------------------

    def _admit(self) -> None:
        hello = self._hello
        if hello.backend != "builtin":
            raise IncomingRefused(f"backend {hello.backend!r} is not supported by this agent")
        self._order_id = verify_hello(self._config, self._channel, hello, self._authority).order.id
        if self._channel.secure:
            self._psk, self._psk_binding = check_source_psk(self._authority, self._channel, hello)
        if self.image_path.exists() and not self._vms.exists(hello.vm_name):
            # Never overwrite or delete an image we cannot account for: it may be someone's only copy.
            raise IncomingRefused(
                f"stale image: {self.image_path.name} already exists on {self._config.name} but no VM "
                f"{hello.vm_name!r} runs there (left over from an earlier migration; its agent removes it "
                "at restart if it is not the live copy)"
            )
        self._vms.reserve_incoming(hello.migration_id, hello.vm_name, hello.memory_bytes)

    def _protection(self) -> RecordProtection:
        if not self._hello.secure:
            return NoProtection()
        secret = channel_secret(self._channel.stream, self._hello.nonce, self._nonce, self._hello.migration_id)  # type: ignore[arg-type]
        keys = derive_session_keys(secret, self._hello.nonce, self._nonce, self._hello.migration_id)
        return AeadProtection(keys.source_to_dest_key, keys.source_to_dest_iv)

    def _receive(self) -> ReceiveResult:
        assert self._image is not None
        protection = self._protection()
        data = self._sessions.wait(self._session_id, self._config.step_timeout_s)
        try:
            data.settimeout(self._config.step_timeout_s)  # a silent peer is a dead peer
            reader = DataStreamReader(protection, self._image.npages)
            digest = self._hello.image_digest if self._hello.secure else None
            receiver = ImageReceiver(self._image, reader, digest=digest)
            return receiver.run(lambda view: _read_into(data, view))
        finally:
            data.close()

    def _verify_manifest(self, result: ReceiveResult) -> dict:
        reply = self._channel.recv(self._config.step_timeout_s)
        if isinstance(reply, Abort):
            raise IncomingRefused(f"the source aborted: {reply.reason}")
        assert isinstance(reply, Manifest)
        manifest = self._signer.verify(reply.envelope, "manifest", self._hello.source_host, self._channel)
        expected = {
            "migration_id": self._hello.migration_id,
            "vm": self._hello.vm_name,
            "source": self._hello.source_host,
            "destination": self._config.name,
            "memory_bytes": self._hello.memory_bytes,
            "channel_binding": self._binding,  # made for this very session, not replayed from another
            "order_id": self._order_id,
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise DocumentError(f"manifest {key} is {manifest.get(key)!r}, expected {value!r}")
        if self._hello.secure:
            if manifest.get("image_digest") != result.image_digest:
                raise DocumentError(
                    f"image digest mismatch: received {result.image_digest}, source signed {manifest.get('image_digest')}"
                )
            if manifest.get("state_digest") != state_digest(result.device_state or b""):
                raise DocumentError("device state digest does not match the signed manifest")
        self._audit(Kinds.MIGRATION_DIGEST, image_digest=result.image_digest, verified=self._hello.secure,
                    manifest=reply.envelope)
        return manifest

    def _start_guest(self, manifest: dict, cpu_started: float) -> None:
        hello = self._hello
        self._store.set_phase(hello.migration_id, "committed")
        self._lab_pause("committed")
        assert self._image is not None
        counter_at_resume = self._image.counter
        self._image.close()
        self._image = None
        assert self._standby is not None
        launched = self._standby.launch()
        self._standby = None
        self._lab_pause("launched")
        vm = self._vms.adopt_incoming(launched)
        self._lab_pause("adopted")
        self._vms.unreserve_incoming(hello.migration_id, hello.vm_name)
        self._store.set_phase(hello.migration_id, "running")
        receipt = self._receipt(
            manifest, "running", counter_at_resume=counter_at_resume, pid=vm.pid, cpu_s=round(time.process_time() - cpu_started, 3)
        )
        self._audit(Kinds.MIGRATION_HANDOVER, decision="committed", vm=hello.vm_name, pid=vm.pid, receipt=receipt)
        self._send_running_receipt(receipt)

    def _discard(self, reason: str) -> None:
        log.warning("migration %s of %s from %s failed: %s", self._hello.migration_id, self._hello.vm_name, self._hello.source_host, reason)
        if self._standby is not None:
            self._standby.cancel()
            self._standby = None
        if self._image is not None:
            self._image.close()
            self._image = None
        if self._created_image:
            self.image_path.unlink(missing_ok=True)
        self._record_abort(reason)


def check_source_psk(authority: Authority, channel: ControlChannel, hello: Hello) -> tuple[PskSession | None, bytes]:
    """The optional second factor, for both backends: if we share a PSK with the source, it must prove it.

    Returns the session (to prove ourselves in Accept and ratchet on commit)
    and its channel binding; a failed proof closes the session and raises.
    """
    psk = authority.psk_session(hello.source_host, "destination")
    if psk is None:
        return None, b""
    binding = psk_channel_binding(channel.stream)  # type: ignore[arg-type]
    try:
        psk.check_peer_proof(hello.psk_proof, binding, hello.nonce)
    except BaseException:
        psk.close()
        raise
    authority.record("psk.verified", migration_id=hello.migration_id, peer=hello.source_host, epoch=psk.epoch,
                     ratcheting=psk.ratcheting)  # fmt: skip
    return psk, binding


def verify_hello(config: AgentConfig, channel: ControlChannel, hello: Hello, authority: Authority) -> VerifiedOrder:
    """Incoming migration control, for every backend: who asks, over what, with which order.

    Cheap checks first; the order (signature, validity, policy, replay cache)
    last. Raises IncomingRefused or a SecurityError with the reason to send back.
    """
    if hello.destination_host != config.name:
        raise IncomingRefused(f"this host is {config.name}, not {hello.destination_host}")
    if channel.secure:
        if channel.peer_name != hello.source_host:
            raise IncomingRefused(f"the source authenticated as {channel.peer_name} but claims to be {hello.source_host}")
        if not hello.secure:
            raise IncomingRefused("an authenticated channel must carry a protected data stream")
        authority.check_peer(channel.stream.peer_certificate, hello.source_host)  # type: ignore[attr-defined]
    else:
        if not config.allow_insecure:
            raise IncomingRefused("plaintext migrations are disabled on this host (allow_insecure = false)")
        if hello.secure:
            raise IncomingRefused("a protected migration needs the TLS control channel")
    monitor_gate.check_incoming(config.name, hello.vm_name, hello.source_host)  # T12: no attacker VM comes in
    # A valid, unused order naming this peer and this host.
    return authority.authorize_incoming(hello.order, hello.vm_name, hello.source_host)


def _read_into(sock: socket.socket, view: memoryview) -> None:
    recv_exactly_into(sock, view)
