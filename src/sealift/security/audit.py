# Long file: the log's record format, hash chain, signatures, export and checks are one format.
"""Append-only, hash-chained, signed audit log (threat T10: non-repudiation).

Each agent writes what it decided and why: orders received, accepted or
refused, rounds, digests, handover, receipts, policy and key changes. One
entry per event, in SQLite (recommended: its own file, `state_dir/audit.sqlite3`,
so that it can be copied, exported and checked on its own):

    audit_log(seq, kind, body, hash, signature)
      body      = canonical JSON {"v", "seq", "ts", "host", "kind", "fields", "prev_hash"}
      hash      = SHA-256(body), hex; prev_hash = hash of entry seq-1 (64 zeros for seq 1)
      signature = ECDSA P-256 (host key) over canonical JSON {"kind": "audit-entry", "hash"}
      kind      = a copy of body.kind, only to filter `show` quickly
    audit_head(seq, hash, signature)   the last entry, signed as {"kind": "audit-head", ...}

The entry and its head update are written in one transaction. SQLite
triggers refuse UPDATE and DELETE on audit_log, so that no code path of the
agent can rewrite history by mistake; an attacker with the file can drop
them, and that is what `verify` is for.

What `verify` detects, and names (the entry's seq, or the position it was found at):
- an edited entry: its body no longer matches its signed hash, or the body
  was edited and its hash recomputed (the signature no longer verifies);
- an inserted or forged entry: not signed by this host's key;
- a deleted entry: its seq is missing (also when later entries were
  renumbered to close the gap: their signed seq no longer matches their place);
- reordered entries: a signed entry found at another place than its seq;
- a duplicated entry, and an entry that does not follow its predecessor in
  the hash chain;
- truncation at the end: the signed head names a later entry than the log
  holds; a deleted or edited head is reported too.

What it cannot detect, locally: a rollback of the whole file (entries and
head together) to an earlier copy, a complete wipe (an empty log with no head
looks new), or anything done by someone who holds the host's private key.
Those need the head anchored elsewhere (e.g. exported to another host or the
operator's machine regularly), which this module does not do.

`export` writes JSON lines (header, each stored entry as it is, head) that
`verify_export` checks offline with the host's public key alone.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
import sqlite3
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sealift.security.errors import AuditError
from sealift.security.signing import canonical_json
from sealift.security.store import SqliteStore, immediate_transaction, open_durable

AUDIT_VERSION = 1
AUDIT_FILE = "audit.sqlite3"
GENESIS_HASH = "0" * 64
MAX_BODY_BYTES = 64 * 1024
EXPORT_FORMAT = "sealift-audit-export"

_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BODY_FIELDS = frozenset({"v", "seq", "ts", "host", "kind", "fields", "prev_hash"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_kind ON audit_log (kind, seq);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class Kinds:
    """Suggested entry kinds, so that `audit show --kind` finds events consistently."""

    AGENT_STARTED = "agent.started"
    ORDER_RECEIVED = "order.received"
    ORDER_ACCEPTED = "order.accepted"
    ORDER_REFUSED = "order.refused"  # fields: order_id, code (OrderError.code), reason
    MIGRATION_ROUND = "migration.round"
    MIGRATION_DIGEST = "migration.digest"
    MIGRATION_HANDOVER = "migration.handover"
    RECEIPT = "migration.receipt"
    POLICY_LOADED = "policy.loaded"
    POLICY_RELOADED = "policy.reloaded"  # fields: path, sha256, rules, trigger
    POLICY_REFUSED = "policy.refused"  # a new policy file was refused; the previous one stays
    CRL_LOADED = "crl.loaded"
    CRL_RELOADED = "crl.reloaded"  # fields: path, number, sha256, entries, trigger
    CRL_REFUSED = "crl.refused"  # a new CRL was refused; the previous one stays
    PEER_REFUSED = "peer.refused"
    MIGRATION_REVOKED = "migration.revoked"  # a certificate an in-flight migration relies on was revoked
    KEY_CHANGED = "key.changed"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    timestamp: str  # ISO 8601 UTC, milliseconds
    host: str
    kind: str
    fields: Mapping[str, Any]
    prev_hash: str
    hash: str
    signature: str  # base64 DER ECDSA

    def to_dict(self) -> dict[str, Any]:
        # Every field in declaration order; `fields` (a read-only mapping) as a plain dict.
        # Not dataclasses.asdict: it deep-copies, and a mappingproxy cannot be copied.
        entry = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        entry["fields"] = dict(self.fields)
        return entry


@dataclass(frozen=True)
class AuditProblem:
    seq: int | None  # the entry (or position) concerned; None for the log as a whole
    what: str

    def __str__(self) -> str:
        return f"#{self.seq}: {self.what}" if self.seq is not None else self.what


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    entries: int  # rows examined
    problems: tuple[AuditProblem, ...]
    head_seq: int | None  # last entry according to the signed head, if it verified


@dataclass(frozen=True)
class _Stored:
    """One row as stored (or exported): what verification works on."""

    seq: int
    kind: str | None
    body: str
    hash: str
    signature: str


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str
    signature: str


class AuditLog(SqliteStore):
    """One host's audit log. Thread-safe; several processes may append to one file."""

    def __init__(
        self,
        db: Path | str | sqlite3.Connection,
        host: str,
        private_key: ec.EllipticCurvePrivateKey | None,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> None:
        """Open (creating if needed) the log of `host` in `db`.

        `db` is a file path (recommended: state_dir/audit.sqlite3) or an open
        connection in autocommit mode (isolation_level=None) that no other
        code uses concurrently; a connection is not closed by `close`.
        Without `private_key` the log is read-only (show, verify, export).
        """
        if public_key is None:
            if private_key is None:
                raise ValueError("give the host's private key (to append) or public key (to verify)")
            public_key = private_key.public_key()
        self.host = host
        self._private_key = private_key
        self.public_key = public_key
        if private_key is not None and not _same_key(private_key.public_key(), self.public_key):
            raise ValueError("private_key and public_key are not a pair")
        if isinstance(db, sqlite3.Connection):
            super().__init__(db, owned=False)
        else:
            super().__init__(open_durable(Path(db)), owned=True)
        if self._db.isolation_level is not None:
            raise ValueError("the audit log needs a connection with isolation_level=None")
        self._db.executescript(_SCHEMA)

    @classmethod
    def for_host(cls, state_dir: Path, host: str, private_key: ec.EllipticCurvePrivateKey) -> AuditLog:
        """The agent's log: state_dir/audit.sqlite3, signed with the host key."""
        return cls(Path(state_dir) / AUDIT_FILE, host, private_key)

    # -- writing ---------------------------------------------------------------

    def append(self, kind: str, **fields: Any) -> AuditEntry:
        """Append one signed entry and return it.

        `kind` is a short dotted name (see Kinds); `fields` are JSON values
        (str, int, bool, None, lists, dicts; no floats NaN/inf).
        """
        if self._private_key is None:
            raise AuditError("this audit log was opened read-only (no private key)")
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"invalid audit kind {kind!r}: lower-case letters, digits, '.', '_', '-'")
        with self._lock, immediate_transaction(self._db):
            return self._append_locked(kind, fields)

    def _append_locked(self, kind: str, fields: dict[str, Any]) -> AuditEntry:
        assert self._private_key is not None
        prev_seq, prev_hash = self._tip()
        seq = prev_seq + 1
        timestamp = _timestamp()
        body = canonical_json(
            {
                "v": AUDIT_VERSION,
                "seq": seq,
                "ts": timestamp,
                "host": self.host,
                "kind": kind,
                "fields": fields,
                "prev_hash": prev_hash,
            }
        ).decode("utf-8")
        if len(body.encode("utf-8")) > MAX_BODY_BYTES:
            raise ValueError(f"audit entry of kind {kind!r} is larger than {MAX_BODY_BYTES} bytes")
        digest = _sha256(body)
        signature = _sign(self._private_key, {"kind": "audit-entry", "hash": digest})
        head_signature = _sign(self._private_key, {"kind": "audit-head", "host": self.host, "seq": seq, "hash": digest})
        self._db.execute(
            "INSERT INTO audit_log (seq, kind, body, hash, signature) VALUES (?, ?, ?, ?, ?)",
            (seq, kind, body, digest, signature),
        )
        self._db.execute(
            "INSERT INTO audit_head (id, seq, hash, signature) VALUES (1, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq, hash=excluded.hash, "
            "signature=excluded.signature",
            (seq, digest, head_signature),
        )
        return AuditEntry(
            seq, timestamp, self.host, kind, types.MappingProxyType(dict(fields)), prev_hash, digest, signature
        )

    def _tip(self) -> tuple[int, str]:
        """Where the next entry attaches: the later of the head and the last row.

        After tampering the two may disagree; either way the new entry is
        chained to a real entry, and verify reports what was done.
        """
        head = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        last = self._db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        candidates = [row for row in (head, last) if row is not None]
        if not candidates:
            return 0, GENESIS_HASH
        seq, digest = max(candidates, key=lambda row: row[0])
        return int(seq), str(digest)

    # -- reading ---------------------------------------------------------------

    def show(self, limit: int = 50, kind: str | None = None) -> list[AuditEntry]:
        """The last `limit` entries (of `kind`, if given), oldest first. Not verified."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        sql = "SELECT seq, kind, body, hash, signature FROM audit_log"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, args + (limit,)).fetchall()
        return [_entry_of(_Stored(*row)) for row in reversed(rows)]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0])

    def verify(self) -> AuditVerification:
        """Check the whole log against the host's public key; see the module docstring."""
        records, head = self._read_all()
        return _verify_records(records, head, self.host, self.public_key)

    def export(self, out: IO[str]) -> int:
        """Write the log as JSON lines for `verify_export`; returns the number of entries."""
        records, head = self._read_all()
        out.write(json.dumps({"format": EXPORT_FORMAT, "version": AUDIT_VERSION, "host": self.host}) + "\n")
        for record in records:
            out.write(
                json.dumps(
                    {
                        "seq": record.seq,
                        "kind": record.kind,
                        "body": record.body,
                        "hash": record.hash,
                        "signature": record.signature,
                    }
                )
                + "\n"
            )
        head_line = None if head is None else {"seq": head.seq, "hash": head.hash, "signature": head.signature}
        out.write(json.dumps({"head": head_line}) + "\n")
        return len(records)

    def _read_all(self) -> tuple[list[_Stored], _Head | None]:
        # One read transaction: entries and head from the same snapshot.
        with self._lock:
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute(
                    "SELECT seq, kind, body, hash, signature FROM audit_log ORDER BY seq"
                ).fetchall()
                head_row = self._db.execute("SELECT seq, hash, signature FROM audit_head WHERE id = 1").fetchone()
            finally:
                self._db.execute("COMMIT")
        records = [_Stored(*row) for row in rows]
        return records, (_Head(*head_row) if head_row else None)


# --------------------------------------------------------------------------
# Verification (pure: used for the live log and for exports)


def verify_export(
    lines: Iterable[str], public_key: ec.EllipticCurvePublicKey, host: str | None = None
) -> AuditVerification:
    """Check an `export` offline with the host's public key (from its trusted certificate).

    `host` defaults to the one named in the export's header; entries signed
    for another host are reported. Raises AuditError if the file is not an
    export at all.
    """
    records: list[_Stored] = []
    head: _Head | None = None
    header_host: str | None = None
    saw_head = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise AuditError(f"line {number} of the export is not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise AuditError(f"line {number} of the export is not a JSON object")
        if number == 1:
            if item.get("format") != EXPORT_FORMAT or not isinstance(item.get("host"), str):
                raise AuditError("not a sealift audit export (bad header line)")
            header_host = item["host"]
        elif "head" in item:
            saw_head = True
            head = _parse_head(item["head"], number)
        else:
            records.append(_parse_record(item, number))
    if header_host is None:
        raise AuditError("empty file: not a sealift audit export")
    if not saw_head:
        # The export was cut: treat as a missing head (reported, not fatal).
        head = None
    return _verify_records(records, head, host or header_host, public_key)


def _verify_records(
    records: Sequence[_Stored],
    head: _Head | None,
    host: str,
    public_key: ec.EllipticCurvePublicKey,
) -> AuditVerification:
    problems: list[AuditProblem] = []
    genuine: dict[int, _Stored] = {}  # signed seq -> record with intact body
    bodies: dict[int, dict[str, Any]] = {}  # signed seq -> its parsed body
    signed_hash: dict[int, str] = {}  # seq -> a hash the host signed (also for edited bodies)
    accounted: set[int] = set()  # seqs that are present in some form

    for record in sorted(records, key=lambda r: r.seq):
        position = record.seq
        if not _signature_ok(public_key, {"kind": "audit-entry", "hash": record.hash}, record.signature):
            problems.append(
                AuditProblem(
                    position,
                    (
                        f"entry at #{position} is not signed by {host}'s key: it was inserted or forged, "
                        "or edited with its hash recomputed"
                    ),
                )
            )
            accounted.add(position)
            continue
        if _sha256(record.body) != record.hash:
            problems.append(
                AuditProblem(position, (f"entry #{position} was edited: its content no longer matches its signed hash"))
            )
            accounted.add(position)
            signed_hash[position] = record.hash
            continue
        body = _parse_body(record.body)
        if body is None:  # signed and intact but unreadable: written by something else
            problems.append(AuditProblem(position, f"entry #{position} is signed but unreadable"))
            accounted.add(position)
            continue
        seq = body["seq"]
        if record.kind is not None and record.kind != body["kind"]:
            problems.append(
                AuditProblem(
                    position,
                    (
                        f"entry #{position} was edited: its kind column says {record.kind!r}, "
                        f"the signed entry says {body['kind']!r}"
                    ),
                )
            )
        if body["host"] != host:
            problems.append(
                AuditProblem(position, (f"entry #{position} belongs to the log of {body['host']!r}, not {host!r}"))
            )
        if seq != position:
            problems.append(
                AuditProblem(
                    position, (f"position #{position} holds entry #{seq}: entries were reordered or renumbered")
                )
            )
        if seq in genuine:
            problems.append(
                AuditProblem(
                    position, (f"entry #{seq} appears twice (at #{genuine[seq].seq} and #{position}): duplicated")
                )
            )
            continue
        genuine[seq] = record
        bodies[seq] = body
        signed_hash[seq] = record.hash
        accounted.add(seq)

    # Hash chain between consecutive entries the host signed.
    for seq, body in sorted(bodies.items()):
        expected = GENESIS_HASH if seq == 1 else signed_hash.get(seq - 1)
        if expected is None:
            continue  # the predecessor is missing or forged: reported already
        if body["prev_hash"] != expected:
            problems.append(
                AuditProblem(
                    seq,
                    (
                        f"entry #{seq} does not follow entry #{seq - 1} in the hash chain "
                        "(entries from another log, or a rewritten log)"
                    ),
                )
            )

    head_seq = _check_head(head, host, public_key, records, genuine, signed_hash, problems)

    # Missing entries: every seq up to the last one known (from rows or head).
    last = max([*accounted, head_seq or 0], default=0)
    last_present = max(accounted, default=0)
    for start, end in _missing_ranges(accounted, last):
        span = f"#{start}" if start == end else f"#{start}–#{end}"
        if start > last_present:
            what = f"entries {span} are missing at the end: the log was truncated (the signed head records #{head_seq})"
        else:
            what = f"entr{'y' if start == end else 'ies'} {span} {'is' if start == end else 'are'} missing: deleted"
        problems.append(AuditProblem(start, what))

    problems.sort(key=lambda p: (p.seq is not None, p.seq or 0))
    return AuditVerification(ok=not problems, entries=len(records), problems=tuple(problems), head_seq=head_seq)


def _check_head(
    head: _Head | None,
    host: str,
    public_key: ec.EllipticCurvePublicKey,
    records: Sequence[_Stored],
    genuine: dict[int, _Stored],
    signed_hash: dict[int, str],
    problems: list[AuditProblem],
) -> int | None:
    """Check the signed head; return its seq if it can be trusted."""
    if head is None:
        if records:
            problems.append(
                AuditProblem(None, ("the signed head is missing (deleted): truncation at the end cannot be ruled out"))
            )
        return None
    signed = {"kind": "audit-head", "host": host, "seq": head.seq, "hash": head.hash}
    if not _signature_ok(public_key, signed, head.signature):
        problems.append(AuditProblem(None, (f"the head (#{head.seq}) is not signed by {host}'s key: it was edited")))
        return None
    known = signed_hash.get(head.seq)
    if known is not None and known != head.hash:
        problems.append(
            AuditProblem(
                head.seq, (f"entry #{head.seq} is not the entry the signed head records: the log was rewritten")
            )
        )
    later = sorted(seq for seq in genuine if seq > head.seq)
    if later:
        problems.append(
            AuditProblem(
                later[0],
                (f"entries from #{later[0]} on are after the signed head (#{head.seq}): the head was rolled back"),
            )
        )
    return head.seq


def _missing_ranges(present: set[int], last: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    start = None
    for seq in range(1, last + 2):
        if seq <= last and seq not in present:
            start = seq if start is None else start
        elif start is not None:
            ranges.append((start, seq - 1))
            start = None
    return ranges


# --------------------------------------------------------------------------
# Helpers


def _parse_body(body: str) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.keys() != _BODY_FIELDS:
        return None
    if (
        isinstance(value["seq"], bool)
        or not isinstance(value["seq"], int)
        or value["seq"] < 1
        or not isinstance(value["kind"], str)
        or not isinstance(value["host"], str)
        or not isinstance(value["fields"], dict)
        or not isinstance(value["ts"], str)
        or not isinstance(value["prev_hash"], str)
    ):
        return None
    return value


def _entry_of(record: _Stored) -> AuditEntry:
    body = _parse_body(record.body)
    if body is None:
        return AuditEntry(
            record.seq, "", "", "(unreadable)", types.MappingProxyType({}), "", record.hash, record.signature
        )
    return AuditEntry(
        record.seq,
        body["ts"],
        body["host"],
        body["kind"],
        types.MappingProxyType(body["fields"]),
        body["prev_hash"],
        record.hash,
        record.signature,
    )


def _parse_record(item: dict[str, Any], number: int) -> _Stored:
    try:
        seq, kind = item["seq"], item.get("kind")
        body, digest, signature = item["body"], item["hash"], item["signature"]
    except KeyError as exc:
        raise AuditError(f"line {number} of the export lacks {exc}") from None
    if (
        isinstance(seq, bool)
        or not isinstance(seq, int)
        or not isinstance(body, str)
        or not isinstance(digest, str)
        or not isinstance(signature, str)
        or not (kind is None or isinstance(kind, str))
    ):
        raise AuditError(f"line {number} of the export has fields of the wrong type")
    return _Stored(seq, kind, body, digest, signature)


def _parse_head(item: Any, number: int) -> _Head | None:
    if item is None:
        return None
    if (
        not isinstance(item, dict)
        or isinstance(item.get("seq"), bool)
        or not isinstance(item.get("seq"), int)
        or not isinstance(item.get("hash"), str)
        or not isinstance(item.get("signature"), str)
    ):
        raise AuditError(f"line {number} of the export: malformed head")
    return _Head(item["seq"], item["hash"], item["signature"])


def _sha256(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _sign(private_key: ec.EllipticCurvePrivateKey, statement: dict[str, Any]) -> str:
    signature = private_key.sign(canonical_json(statement), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def _signature_ok(public_key: ec.EllipticCurvePublicKey, statement: dict[str, Any], signature: str) -> bool:
    if not _HEX64.fullmatch(str(statement.get("hash", ""))):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, canonical_json(statement), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def _timestamp() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
