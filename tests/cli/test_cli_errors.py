"""A failing command with --json prints {"status": "failed", "error": ..., "code": ...}; in text mode only the message.

No agent runs here: a malformed order file, and a fake control socket that answers
every request with an error reply (with and without the agent's reason code).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.cli.main import main


@pytest.fixture
def malformed_order(tmp_path: Path) -> Path:
    path = tmp_path / "order.json"
    path.write_text('{"not": "an order"}')
    return path


def fake_agent(path: Path, reply: dict) -> threading.Thread:
    """A control socket that answers one request with `reply`, then closes."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve_once() -> None:
        with server:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as stream:
                stream.readline()
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def agent_socket() -> Iterator[Path]:
    # A short directory: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="sealift-cli-") as directory:
        yield Path(directory) / "control.sock"


def test_order_show_on_a_malformed_file_prints_the_code(malformed_order: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sealift", "order", "show", str(malformed_order), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    failure = json.loads(done.stdout)
    assert failure["status"] == "failed"
    assert failure["code"] == "malformed"  # MalformedOrderError's
    assert failure["error"].startswith("not a readable order")
    assert "error: not a readable order" in done.stderr


def test_text_mode_prints_the_message_only(malformed_order: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["order", "show", str(malformed_order)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: not a readable order" in captured.err
    assert "code" not in captured.err


def test_the_agents_code_is_carried_through(agent_socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent(agent_socket, {"ok": False, "error": "order expired 3 s ago", "code": "order_expired"})
    assert main(["status", "--socket", str(agent_socket), "--json"]) == 2
    assert json.loads(capsys.readouterr().out) == {
        "status": "failed",
        "error": "order expired 3 s ago",
        "code": "order_expired",
    }


def test_an_agent_error_without_a_code_gets_the_clients(agent_socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent(agent_socket, {"ok": False, "error": "unknown operation 'status'"})
    assert main(["status", "--socket", str(agent_socket), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["code"] == "agent_request_failed"


def test_a_refused_migration_prints_the_code(
    tmp_path: Path, agent_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sealift.security.identity import ClusterCA

    ClusterCA.init(tmp_path / "ca").issue_operator("alice", "operator", tmp_path / "operators")
    order = tmp_path / "order.json"
    assert (
        main(
            [
                "order",
                "create",
                "vm1",
                "--from",
                "host-a",
                "--to",
                "host-b",
                "--operator",
                "alice",
                "--operator-dir",
                str(tmp_path / "operators"),
                "--out",
                str(order),
            ]
        )
        == 0
    )
    capsys.readouterr()
    fake_agent(agent_socket, {"ok": False, "error": "order refused: wrong source", "code": "wrong_source"})
    assert main(["migrate", "--order", str(order), "--socket", str(agent_socket), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "status": "failed",
        "error": "order refused: wrong source",
        "code": "wrong_source",
    }


def test_no_agent_is_an_error_with_a_code(agent_socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vm", "list", "--socket", str(agent_socket), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["code"] == "agent_unavailable"


@pytest.fixture
def order_with_a_malformed_certificate(tmp_path: Path) -> Path:
    """An order signed by alice whose certificate loads but whose subjectAltName does not parse (issue 23)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    from sealift.security.identity import ClusterCA
    from sealift.security.orders import create_order
    from sealift.security.signing import sign_document

    ca = ClusterCA.init(tmp_path / "ca")
    template = json.loads(
        create_order(ca.issue_operator("alice", "admin", tmp_path / "ops"), "vm1", "host-a", "host-b")
    )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        # A SAN whose inner SEQUENCE claims 5 bytes and has 2: the certificate loads, reading its SAN fails.
        .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x05\x86\x01"), False)
        .sign(ca._key, hashes.SHA256())
    )
    payload = {**template["payload"], "issuer_certificate": cert.public_bytes(serialization.Encoding.PEM).decode()}
    path = tmp_path / "order.json"
    path.write_text(sign_document(payload, key, signer="alice", kind="migration-order"))
    return path


def test_order_show_on_a_certificate_malformed_inside_prints_one_line(order_with_a_malformed_certificate: Path) -> None:
    for json_flag in ([], ["--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "sealift", "order", "show", str(order_with_a_malformed_certificate), *json_flag],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("error: malformed order") and done.stderr.count("\n") == 1  # one line
        assert "issuer certificate" in done.stderr
        if json_flag:
            failure = json.loads(done.stdout)
            assert failure["code"] == "malformed" and failure["status"] == "failed"
            assert "is malformed: its extensions cannot be parsed" in failure["error"]
        else:
            assert done.stdout == ""


def test_migrate_with_an_order_whose_certificate_is_malformed_inside_fails_cleanly(
    order_with_a_malformed_certificate: Path, agent_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read before anything is sent: no agent needed, one line, the code with --json."""
    order = str(order_with_a_malformed_certificate)
    assert main(["migrate", "--order", order, "--socket", str(agent_socket), "--json"]) == 2
    failure = json.loads(capsys.readouterr().out)
    assert failure["code"] == "malformed" and "issuer certificate" in failure["error"]
    assert main(["migrate", "--order", order, "--socket", str(agent_socket)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: malformed order")


def test_an_order_file_that_is_not_utf8_is_a_malformed_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "order.bin"
    path.write_bytes(b'{"alg": "\xff\xfe"}')
    assert main(["order", "show", str(path), "--json"]) == 2
    failure = json.loads(capsys.readouterr().out)
    assert failure["code"] == "malformed" and "not UTF-8" in failure["error"]
