"""Mutual TLS 1.3 between sealift hosts, over ordinary TCP sockets.

pyOpenSSL rather than the standard `ssl` module because the channel binding
(`keys.channel_secret`) needs the TLS 1.3 exporter, which Python 3.11's `ssl`
does not offer.

Blocking use with deadlines: the socket is switched to non-blocking mode and
every operation loops over pyOpenSSL's WantRead/WantWrite, waiting with
poll() until a deadline. That is how a total deadline on the handshake works
(a client that dribbles one byte a second cannot hold a slot), which a
per-syscall socket timeout would not give.

A TlsStream is not thread-safe: an OpenSSL connection must not be read and
written from two threads at once. Use one thread per stream, or a lock.
"""

from __future__ import annotations

import functools
import select
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL import crypto as _crypto

from sealift.security.errors import (
    CertificateError,
    HandshakeError,
    PeerIdentityError,
    SecurityError,
)
from sealift.security.identity import HostIdentity, read_host_certificate, validate_hostname

_T = TypeVar("_T")

_TLS13_CIPHERSUITES = b"TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
_ECDHE_GROUPS = b"X25519:P-256"

# A TLS record carries at most 16 KiB of plaintext and SSL_read returns at
# most one record, while pyOpenSSL allocates the full requested size per call:
# asking for more only wastes an allocation.
_MAX_READ = 16384
# SSL_write takes an int length.
_MAX_WRITE = 1 << 30
# HKDF-Expand limit of the exporter with SHA-256 (the smaller of our suites' hashes).
_MAX_EXPORT = 255 * 32

# The X.509 verification errors an operator is likely to meet, in words.
_VERIFY_ERRORS = {
    7: "certificate signature failure",
    9: "certificate is not yet valid (check the clocks)",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "certificate was not issued by this cluster's CA",
    21: "certificate was not issued by this cluster's CA",
    22: "certificate chain too long",
    24: "invalid CA certificate",
    26: "certificate is not meant for this purpose (not a host certificate)",
}

# OpenSSL reasons that need a word of context to be actionable.
_HINTS = {
    "unsupported protocol": "the peer does not speak TLS 1.3",
    "no shared cipher": "the peer offers neither TLS_AES_256_GCM_SHA384 nor TLS_AES_128_GCM_SHA256",
    "no suitable key share": "the peer offers neither X25519 nor P-256",
    "tlsv1 alert unknown ca": "the peer does not trust our certificate: is it in another cluster?",
    "peer did not return a certificate": "a sealift host must present its host certificate",
}


# --------------------------------------------------------------------------
# Contexts


def server_context(identity: HostIdentity) -> SSL.Context:
    """TLS 1.3 server context: presents `identity`, requires a client certificate."""
    return _context(identity)


def client_context(identity: HostIdentity) -> SSL.Context:
    """TLS 1.3 client context: presents `identity`, verifies the server's certificate."""
    return _context(identity)


def _context(identity: HostIdentity) -> SSL.Context:
    # Both roles have the same policy: every host is client and server.
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(_TLS13_CIPHERSUITES)
    _set_groups(ctx)
    # No tickets, no session cache: every connection is a full handshake with
    # a fresh ECDHE exchange and certificate check (no resumption, no 0-RTT;
    # early data is also off by OpenSSL's default max_early_data of 0).
    # OP_IGNORE_UNEXPECTED_EOF stays off: an EOF without close_notify must be
    # an error (truncation), not a clean end.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        ctx.use_certificate(identity.certificate())
        ctx.use_privatekey(identity.private_key())
        ctx.check_privatekey()
        # The cluster CA is the only trust anchor: no system CA store.
        ctx.load_verify_locations(str(identity.ca_path))
    except SSL.Error as exc:
        raise CertificateError(
            f"cannot use the identity of {identity.name!r} ({identity.cert_path}, "
            f"{identity.key_path}, {identity.ca_path}): {_ssl_reason(exc)}"
        ) from None
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _record_verify_failure)
    # Host certificates are signed directly by the cluster CA; no intermediates.
    ctx.set_verify_depth(1)
    return ctx


def _set_groups(ctx: SSL.Context) -> None:
    """Restrict key exchange to X25519 and P-256.

    pyOpenSSL has no public call for a group list, so this uses the OpenSSL
    binding pyOpenSSL itself uses. If a later pyOpenSSL removes it, fall back
    to the public set_tmp_ecdh, which allows P-256 alone: still within policy.
    """
    try:
        from OpenSSL._util import lib as _lib

        set_list = _lib.SSL_CTX_set1_curves_list
        raw_ctx = ctx._context  # noqa: SLF001 - see docstring
    except (ImportError, AttributeError):
        ctx.set_tmp_ecdh(ec.SECP256R1())
        return
    if set_list(raw_ctx, _ECDHE_GROUPS) != 1:
        raise SecurityError(f"this OpenSSL refuses the key-exchange groups {_ECDHE_GROUPS!r}")


def _record_verify_failure(conn: SSL.Connection, cert: _crypto.X509, errnum: int, depth: int, ok: int) -> bool:
    """Keep the first certificate error, to explain a refusal in words."""
    failures = conn.get_app_data()
    if not ok and isinstance(failures, list) and not failures:
        reason = _VERIFY_ERRORS.get(errnum, f"X.509 verification error {errnum}")
        subject = cert.to_cryptography().subject.rfc4514_string()
        failures.append(f"peer certificate {subject!r} refused: {reason}")
    return bool(ok)


# --------------------------------------------------------------------------
# Stream


class TlsStream:
    """An authenticated TLS 1.3 connection to a known peer host."""

    def __init__(
        self,
        sock: socket.socket,
        conn: SSL.Connection,
        peer_name: str,
        peer_certificate: x509.Certificate,
    ) -> None:
        # Built by connect() or accept(), after a successful handshake.
        self._sock = sock
        self._conn = conn
        self._timeout: float | None = None
        self._closed = False
        self.peer_name = peer_name
        self.peer_certificate = peer_certificate

    @classmethod
    def connect(
        cls,
        sock: socket.socket,
        context: SSL.Context,
        expected_peer: str,
        timeout: float = 10.0,
    ) -> TlsStream:
        """Run the client handshake on the connected `sock` and check the server's name.

        Raises HandshakeError (the handshake failed or took longer than
        `timeout` seconds) or PeerIdentityError (the server is another host).
        The socket is closed on failure. The returned stream has no timeout.
        """
        validate_hostname(expected_peer)
        stream = cls._handshake(sock, context, server=False, timeout=timeout)
        if stream.peer_name.lower() != expected_peer.lower():
            stream.close()
            raise PeerIdentityError(f"peer presented certificate for {stream.peer_name!r}, expected {expected_peer!r}")
        return stream

    @classmethod
    def accept(cls, sock: socket.socket, context: SSL.Context, timeout: float = 10.0) -> TlsStream:
        """Run the server handshake on the accepted `sock`, within `timeout` seconds.

        The deadline covers the whole handshake, before the client has
        authenticated, so a slow or silent client cannot hold the connection.
        Raises HandshakeError and closes the socket on failure or timeout.
        The returned stream has no timeout.
        """
        return cls._handshake(sock, context, server=True, timeout=timeout)

    @classmethod
    def _handshake(cls, sock: socket.socket, context: SSL.Context, *, server: bool, timeout: float) -> TlsStream:
        _check_timeout(timeout)
        deadline = time.monotonic() + timeout
        peer = _peer_address(sock)
        sock.setblocking(False)
        _set_nodelay(sock)
        conn = SSL.Connection(context, sock)
        failures: list[str] = []
        conn.set_app_data(failures)
        if server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        try:
            _io(sock, conn.do_handshake, deadline)
        except TimeoutError:
            sock.close()
            raise HandshakeError(f"TLS handshake with {peer} did not complete within {timeout:g} s") from None
        except SSL.Error as exc:
            sock.close()
            reason = failures[0] if failures else _ssl_reason(exc)
            raise HandshakeError(f"TLS handshake with {peer} failed: {reason}") from None
        except OSError as exc:
            sock.close()
            raise HandshakeError(f"TLS handshake with {peer} failed: {exc}") from None

        cert = conn.get_peer_certificate(as_cryptography=True)
        try:
            if cert is None:
                raise CertificateError("no certificate")
            name = read_host_certificate(cert)  # every part later read, parsed now
        except CertificateError as exc:
            sock.close()
            raise PeerIdentityError(f"peer {peer} is not a sealift host: {exc}") from None
        return cls(sock, conn, name, cert)

    # ---- information

    @property
    def protocol_version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def cipher_name(self) -> str:
        return self._conn.get_cipher_name() or ""

    @property
    def group_name(self) -> str:
        """The key-exchange group of the handshake (e.g. 'x25519')."""
        return self._conn.get_group_name() or ""

    def fileno(self) -> int:
        return self._sock.fileno()

    # ---- data

    def settimeout(self, timeout: float | None) -> None:
        """Deadline in seconds for each later sendall/recv/recv_exactly call; None waits forever.

        After a TimeoutError in the middle of sendall or recv_exactly the
        stream's position is unknown: close it.
        """
        if timeout is not None:
            _check_timeout(timeout)
        self._timeout = timeout

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        deadline = self._deadline()
        sent = 0
        while sent < len(view):
            chunk = view[sent : sent + _MAX_WRITE]
            try:
                sent += _io(self._sock, functools.partial(self._conn.send, chunk), deadline)
            except SSL.Error as exc:
                raise ConnectionError(f"TLS send to {self.peer_name} failed: {_ssl_reason(exc)}") from None

    def recv(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` bytes (at most one TLS record); b"" when the peer closed cleanly.

        An end of stream without the peer's close_notify is a ConnectionError,
        not b"": it may be a truncation attack.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        return self._recv(min(max_bytes, _MAX_READ), self._deadline())

    def recv_exactly(self, n: int) -> bytes:
        """Exactly `n` bytes; ConnectionError if the stream ends first."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        deadline = self._deadline()
        # Collect and join once: one output allocation and copy per call.
        chunks: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._recv(min(n - got, _MAX_READ), deadline)
            if not chunk:
                raise ConnectionError(f"{self.peer_name} closed the connection after {got} of {n} expected bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _recv(self, n: int, deadline: float | None) -> bytes:
        try:
            return _io(self._sock, functools.partial(self._conn.recv, n), deadline)
        except SSL.ZeroReturnError:
            return b""  # the peer sent close_notify
        except SSL.Error as exc:
            raise ConnectionError(f"TLS receive from {self.peer_name} failed: {_ssl_reason(exc)}") from None

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        """RFC 8446 section 7.5 exporter: the same bytes on both ends of this connection only."""
        if not 1 <= length <= _MAX_EXPORT:
            raise ValueError(f"exporter length must be 1..{_MAX_EXPORT}, got {length}")
        return self._conn.export_keying_material(label, length, context)

    # ---- closing

    def close(self) -> None:
        """Send close_notify if possible, then close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.shutdown()
        except (SSL.Error, OSError):
            pass  # best effort: the peer may already be gone
        self._sock.close()

    def __enter__(self) -> TlsStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TlsStream peer={self.peer_name!r} {state}>"

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout


# --------------------------------------------------------------------------
# Helpers


def _io(sock: socket.socket, op: Callable[[], _T], deadline: float | None) -> _T:
    """Run a pyOpenSSL operation to completion, waiting for the socket until `deadline`."""
    while True:
        try:
            return op()
        except SSL.WantReadError:
            _wait(sock, select.POLLIN, deadline)
        except SSL.WantWriteError:
            _wait(sock, select.POLLOUT, deadline)


def _wait(sock: socket.socket, event: int, deadline: float | None) -> None:
    # poll, not select: an agent may hold descriptors above FD_SETSIZE (1024).
    if deadline is None:
        timeout_ms = None
    else:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("TLS operation timed out")
        timeout_ms = max(1, int(remaining * 1000 + 0.999))
    poller = select.poll()
    poller.register(sock, event)
    if not poller.poll(timeout_ms):
        raise TimeoutError("TLS operation timed out")


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _set_nodelay(sock: socket.socket) -> None:
    # Control messages are small request/response exchanges: Nagle's delay
    # would add up to 40 ms per round trip.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (e.g. a socketpair in a test)


def _peer_address(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:
        return "(unconnected socket)"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address) or "(unnamed peer)"


def _ssl_reason(exc: SSL.Error) -> str:
    """pyOpenSSL errors carry a list of (library, function, reason) tuples; keep the reasons."""
    if isinstance(exc, SSL.SysCallError):
        errno, text = (exc.args + (None, None))[:2]
        if errno == -1:
            return "connection closed during TLS exchange"
        return f"{text} (errno {errno})" if text else "connection error"
    details = exc.args[0] if exc.args else None
    if isinstance(details, list) and details:
        reasons = [str(item[-1]) for item in details if isinstance(item, tuple)]
        return "; ".join(f"{r} ({_HINTS[r]})" if r in _HINTS else r for r in reasons)
    return str(exc) or type(exc).__name__
