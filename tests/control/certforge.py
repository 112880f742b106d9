"""Forging certificates that load but are malformed inside, as an attacker (or a broken CA) would.

The outer DER stays well formed (lengths recomputed, re-signed by the CA
key), so `x509.load_*_certificate` accepts the result and `cryptography`
only meets the damage when it reads the name, extension or key lazily.
Used by the tests of the parse boundary and by the structure-aware fuzz.
"""

from __future__ import annotations

import base64
import datetime
import json
import random
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from sealift.security.identity import ClusterCA
from sealift.security.operators import OPERATOR_URI_PREFIX
from sealift.security.signing import sign_document

ECDSA_WITH_SHA256 = bytes.fromhex("2a8648ce3d040302")
P256_OID = bytes.fromhex("2a8648ce3d030107")
SEQUENCE = 0x30
EXTENSIONS_TAG = 0xA3  # [3] EXPLICIT, in the TBSCertificate
STRING_TAGS = (0x0C, 0x13, 0x14, 0x16, 0x1C, 0x1E)  # UTF8, Printable, Teletex, IA5, Universal, BMP


# --------------------------------------------------------------------------
# DER, just enough of it


def tlv(tag: int, body: bytes) -> bytes:
    """One DER element (definite length)."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def elements(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, body) of each DER element in `data` (well-formed input only: we wrote it)."""
    found = []
    at = 0
    while at < len(data):
        tag, first = data[at], data[at + 1]
        at += 2
        if first < 0x80:
            length = first
        else:
            length = int.from_bytes(data[at : at + (first & 0x7F)], "big")
            at += first & 0x7F
        found.append((tag, data[at : at + length]))
        at += length
    return found


def resign(tbs: bytes, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The DER certificate for `tbs`, signed ecdsa-with-SHA256 by `ca_key`."""
    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    algorithm = tlv(SEQUENCE, tlv(0x06, ECDSA_WITH_SHA256))
    return tlv(SEQUENCE, tbs + algorithm + tlv(0x03, b"\x00" + signature))


def tbs_fields(cert: x509.Certificate) -> list[tuple[int, bytes]]:
    (tag, body) = elements(cert.tbs_certificate_bytes)[0]
    assert tag == SEQUENCE
    return elements(body)


def join_tbs(fields: Sequence[tuple[int, bytes]]) -> bytes:
    return tlv(SEQUENCE, b"".join(tlv(tag, body) for tag, body in fields))


def edit_extensions(
    cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, edit: Callable[[list[bytes]], list[bytes]]
) -> bytes:
    """`cert` re-signed with its list of Extension elements (each a whole DER SEQUENCE) replaced by `edit(list)`."""
    fields = tbs_fields(cert)
    out = []
    for tag, body in fields:
        if tag == EXTENSIONS_TAG:
            (_, sequence) = elements(body)[0]
            extensions = [tlv(t, b) for t, b in elements(sequence)]
            body = tlv(SEQUENCE, b"".join(edit(extensions)))
        out.append((tag, body))
    return resign(join_tbs(out), ca_key)


def extension_oid(extension: bytes) -> bytes:
    (_, body) = elements(extension)[0]
    return elements(body)[0][1]


def with_extension_value(extension: bytes, value: bytes) -> bytes:
    """The Extension element with its extnValue (the DER inside the OCTET STRING) replaced by `value`."""
    (_, body) = elements(extension)[0]
    parts = elements(body)
    parts[-1] = (0x04, value)
    return tlv(SEQUENCE, b"".join(tlv(tag, part) for tag, part in parts))


def extension_value(extension: bytes) -> bytes:
    (_, body) = elements(extension)[0]
    return elements(body)[-1][1]


# --------------------------------------------------------------------------
# Certificates


def ca_key_of(ca: ClusterCA) -> ec.EllipticCurvePrivateKey:
    return ca._key  # the tests play the CA (or someone holding a CA-signed malformed certificate)


def operator_certificate(
    ca: ClusterCA, name: str, role: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A well-formed operator certificate for `name`, as `ClusterCA.issue_operator` makes one, and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(OPERATOR_URI_PREFIX + name)]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key_of(ca), hashes.SHA256())
    )
    return cert, key


def host_certificate(ca: ClusterCA, name: str) -> x509.Certificate:
    """A well-formed host certificate for `name` (a fresh P-256 key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key_of(ca), hashes.SHA256())
    )


def replace_in_tbs(cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, old: bytes, new: bytes) -> bytes:
    """`cert` re-signed with the first `old` in its TBSCertificate replaced by `new` (same length)."""
    assert len(old) == len(new), "a same-length edit keeps every enclosing length right"
    tbs = cert.tbs_certificate_bytes
    assert old in tbs, f"{old!r} is not in the certificate"
    return resign(tbs.replace(old, new, 1), ca_key)


def replace_extension(cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, oid: bytes, value: bytes) -> bytes:
    """`cert` re-signed with the value of its extension `oid` (DER of the OID's body) replaced by `value`."""

    def edit(extensions: list[bytes]) -> list[bytes]:
        return [with_extension_value(e, value) if extension_oid(e) == oid else e for e in extensions]

    return edit_extensions(cert, ca_key, edit)


def oid_der(oid: x509.ObjectIdentifier) -> bytes:
    """The body of the DER OBJECT IDENTIFIER for `oid`."""
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


SAN_OID = oid_der(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
EKU_OID = oid_der(ExtensionOID.EXTENDED_KEY_USAGE)
BASIC_CONSTRAINTS_OID = oid_der(ExtensionOID.BASIC_CONSTRAINTS)


def pem(der: bytes) -> str:
    """PEM of any DER, loadable or not (the order carries whatever an attacker put there)."""
    text = base64.b64encode(der).decode("ascii")
    lines = "".join(text[i : i + 64] + "\n" for i in range(0, len(text), 64))
    return "-----BEGIN CERTIFICATE-----\n" + lines + "-----END CERTIFICATE-----\n"


def load(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


# --------------------------------------------------------------------------
# Orders


def order_with_certificate(
    template: str, certificate_pem: str, key: ec.EllipticCurvePrivateKey, signer: str, **payload_changes: object
) -> str:
    """The order `template` with `certificate_pem` as its issuer's certificate, signed by `key` as `signer`."""
    payload = json.loads(template)["payload"]
    payload.update(payload_changes)
    payload["issuer_certificate"] = certificate_pem
    payload["issuer"] = signer
    return sign_document(payload, key, signer=signer, kind="migration-order")


# --------------------------------------------------------------------------
# Structure-aware mutation (the fuzz)


def mutate_der(rng: random.Random, value: bytes) -> bytes:
    """A damaged copy of the DER `value`: a flipped or changed byte, a truncated or padded inner TLV, a wrong tag."""
    if not value:
        return bytes([rng.choice((0x30, 0x04, 0x05))])
    data = bytearray(value)
    how = rng.randrange(7)
    at = rng.randrange(len(data))
    if how == 0:
        data[at] ^= 1 << rng.randrange(8)
    elif how == 1:
        data[at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF, rng.randrange(256)))
    elif how == 2:
        del data[at:]  # truncated: the inner lengths now overrun
    elif how == 3:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
    elif how == 4:
        data[0] = rng.choice((0x01, 0x02, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x30, 0x31, 0x80, 0x86, 0xA0))
    elif how == 5:
        inner = elements_or_none(bytes(data))
        if inner:
            tag, body = rng.choice(inner)
            data = bytearray(tlv(tag, tlv(SEQUENCE, body)))  # one level too deep
        else:
            data[at] = 0xFF
    else:
        data = bytearray(tlv(SEQUENCE, bytes(data)))  # an extra wrapper
    return bytes(data)


def elements_or_none(data: bytes) -> list[tuple[int, bytes]] | None:
    try:
        return elements(data)
    except IndexError:
        return None


def mutate_certificate(rng: random.Random, cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """`cert` with one inner field damaged (an extension's value, a subject attribute, the key), re-signed.

    The outer encoding is always valid DER: every enclosing length is recomputed.
    """
    target = rng.randrange(5)
    fields = tbs_fields(cert)
    if target <= 1:  # an extension's value: the parts read lazily
        return edit_extensions(cert, ca_key, lambda exts: _mutate_one_extension(rng, exts))
    if target == 2:  # the subject: a name read lazily
        index = 5
    elif target == 3:  # the subject public key info: read when the key is used
        index = 6
    else:  # the issuer
        index = 3
    tag, body = fields[index]
    fields[index] = (tag, _mutate_inner(rng, body))
    return resign(join_tbs(fields), ca_key)


def _mutate_one_extension(rng: random.Random, extensions: list[bytes]) -> list[bytes]:
    index = rng.randrange(len(extensions))
    chosen = extensions[index]
    choice = rng.randrange(4)
    if choice == 0:  # duplicate it
        return [*extensions, chosen]
    if choice == 1:  # an extension of another OID with this value (a SAN where an EKU belongs, ...)
        other = extensions[rng.randrange(len(extensions))]
        return [*extensions[:index], with_extension_value(chosen, extension_value(other)), *extensions[index + 1 :]]
    mutated = with_extension_value(chosen, mutate_der(rng, extension_value(chosen)))
    return [*extensions[:index], mutated, *extensions[index + 1 :]]


def _mutate_inner(rng: random.Random, body: bytes) -> bytes:
    """Damage one leaf of a structure, keeping every enclosing length right."""
    parts = elements_or_none(body)
    if not parts or rng.random() < 0.3:
        return mutate_der(rng, body)
    index = rng.randrange(len(parts))
    tag, inner = parts[index]
    if tag in (SEQUENCE, 0x31) and rng.random() < 0.7:
        replaced = (tag, _mutate_inner(rng, inner))
    elif rng.random() < 0.5:
        replaced = (rng.choice((*STRING_TAGS, 0x02, 0x04, 0x05, 0x06, 0x03)), inner)
    else:
        replaced = (tag, mutate_der(rng, inner)[: len(inner) + 3])
    parts[index] = replaced
    return b"".join(tlv(t, b) for t, b in parts)
