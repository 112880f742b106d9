"""The root of sealift's errors: one base class with a machine-readable reason code.

Every error sealift raises on purpose derives from `SealiftError`, so a caller
(the CLI, the control API, a test) can catch one class and still tell the
failures apart by `code`, a short snake_case string, without parsing messages.

This module imports nothing from sealift: every layer may import it.

The hierarchy (class: default code; the module in brackets):

    SealiftError: sealift_error
    ├── SecurityError: security_error                 [security.errors]
    │   ├── CertificateError: certificate_error       [security.errors]
    │   │   ├── MalformedCertificateError: malformed_certificate  [security.errors]
    │   │   ├── CertificateRevokedError: certificate_revoked  [security.revocation]
    │   │   └── CrlError: crl_error                   [security.revocation]
    │   ├── PeerIdentityError: peer_identity_error    [security.errors]
    │   ├── SignatureError: signature_error           [security.errors]
    │   ├── HandshakeError: handshake_failed          [security.errors]
    │   ├── OrderError: refused                       [security.orders]
    │   │   ├── MalformedOrderError: malformed
    │   │   │   └── OrderTooLargeError: too_large
    │   │   ├── OrderSignatureError: bad_signature
    │   │   ├── UntrustedIssuerError: untrusted_issuer
    │   │   │   └── IssuerRevokedError: issuer_revoked
    │   │   ├── OrderExpiredError: expired
    │   │   ├── OrderNotYetValidError: not_yet_valid
    │   │   ├── WrongSourceError: wrong_source
    │   │   ├── WrongDestinationError: wrong_destination
    │   │   ├── OrderReplayedError: replayed
    │   │   └── PolicyDeniedError: denied_by_policy   [security.policy]
    │   ├── PolicyFileError: policy_file_error        [security.policy]
    │   ├── AuditError: audit_error                   [security.audit]
    │   ├── PskError: psk_error                       [security.psk]
    │   └── MonitorRefusal: monitor_refused           [migration.gate]
    ├── ProtocolError: protocol_error                 [wire.errors]
    │   └── RecordAuthError: record_auth_failed       [wire.errors]
    ├── PortRefusal: port_refused                     [agent.guard]
    │       (instances: slow_handshake, table_full, evicted, peer_limit, rate_limited, blocked)
    ├── VmError: vm_error                             [backends.builtin.vm]
    ├── QemuError: qemu_error                         [backends.qemu.vm]
    ├── IpsecError: ipsec_error (also RuntimeError)   [ipsec.tunnel]
    ├── CharonError: charon_error (also RuntimeError) [ipsec.charon]
    ├── ViciError: vici_error (also RuntimeError)     [ipsec.vici_client]
    ├── BenchError: bench_error                       [bench.harness]
    ├── SshError: ssh_tunnel_error                    [bench.sshtunnel]
    ├── WireguardError: wireguard_error               [bench.wireguard]
    ├── MigrationFailed: lab_migration_failed         [lab.runner]
    ├── NetnsError: netns_error                       [lab.netns]
    ├── TestbedError: testbed_error                   [lab.testbed]
    ├── CaptureError: capture_error                   [lab.capture]
    └── CliError: cli_error                           [cli.common]

The order codes (refused, malformed, expired, ...) predate this class: they are
written to the audit log's `order.refused` entries, so they keep their names.
MonitorRefusal instances carry the monitor's own code (e.g. vm_flagged_attacker).
"""

from __future__ import annotations


class SealiftError(Exception):
    """Base of sealift's errors. `code` says why, for machines; the message says why, for people.

    Each subclass sets a distinct default `code`; one instance may carry a more
    precise one: `SealiftError("the order expired", code="order_expired")`.
    """

    code: str = "sealift_error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # this instance's reason; the class default stays

    @property
    def reason(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""
