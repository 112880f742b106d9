"""`sealift agent --check-config`: a real cluster's config passes; each kind of breakage fails, saying what.

LocalCluster writes real configs, policies and PKI (no agent is started here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealift.cli.main import main
from sealift.cluster import LocalCluster
from sealift.host.checkup import Check as ConfigCheck
from sealift.security.identity import ClusterCA

Check = Callable[[str, object], None]  # the check_json fixture (tests/conftest.py)

CHECKS = [
    "config",
    "host name",
    "host key",
    "host certificate",
    "CA certificate",
    "identity",
    "policy",
    "CRL",
    "state_dir",
    "vm_dir",
    "control socket directory",
]


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    yield cluster
    cluster.cleanup()


def config_of(cluster: LocalCluster, host: str = "host-a") -> Path:
    return cluster.agents[host].config_path


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    status = main(["agent", "--check-config", "--config", str(config), "--json"])
    return status, json.loads(capsys.readouterr().out)


def failed(result: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in result["checks"] if not c["ok"]}


def test_a_good_config_passes(cluster: LocalCluster, capsys: pytest.CaptureFixture[str], check_json: Check) -> None:
    status, result = check(config_of(cluster), capsys)
    assert status == 0 and result["status"] == "ok", result
    check_json("agent-check-config", result)
    assert [c["name"] for c in result["checks"]] == CHECKS
    assert all(c["ok"] and c["detail"] for c in result["checks"])
    details = {c["name"]: c["detail"] for c in result["checks"]}
    assert "valid until" in details["identity"]
    assert "1 rule(s)" in details["policy"]
    assert "revocation is not checked" in details["CRL"]  # no CRL published yet


def test_text_output_is_one_line_per_check(cluster: LocalCluster) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sealift", "agent", "--check-config", "--config", str(config_of(cluster))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"✓ {name}" for name in CHECKS]
    assert lines[-1] == "config OK"


def test_a_missing_key(cluster: LocalCluster, capsys: pytest.CaptureFixture[str], check_json: Check) -> None:
    (cluster.pki / "host-a.key").unlink()
    status, result = check(config_of(cluster), capsys)
    assert status == 1 and result["status"] == "failed"
    check_json("agent-check-config", result)
    problems = failed(result)
    assert set(problems) == {"host key", "identity"}
    assert "host-a.key does not exist" in problems["host key"]
    assert problems["identity"].startswith("not checked")


def test_a_key_others_can_read(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    (cluster.pki / "host-a.key").chmod(0o644)
    status, result = check(config_of(cluster), capsys)
    assert status == 1
    assert "chmod 600" in failed(result)["host key"]


def test_another_hosts_certificate(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(cluster.pki / "host-b.pem", cluster.pki / "host-a.pem")
    status, result = check(config_of(cluster), capsys)
    assert status == 1
    assert "issued for 'host-b'" in failed(result)["host certificate"]


def test_a_certificate_of_another_ca_and_key(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = ClusterCA.init(tmp_path / "other-ca")
    other.issue_host("host-a", tmp_path / "other")
    shutil.copy(tmp_path / "other" / "host-a.pem", cluster.pki / "host-a.pem")
    status, result = check(config_of(cluster), capsys)
    assert status == 1
    assert set(failed(result)) == {"identity"}
    assert "does not belong to" in failed(result)["identity"]


def test_bad_toml(cluster: LocalCluster, capsys: pytest.CaptureFixture[str], check_json: Check) -> None:
    config = config_of(cluster)
    config.write_text(config.read_text() + "\nthis is not toml\n")
    status, result = check(config, capsys)
    assert status == 1 and result["status"] == "failed"
    check_json("agent-check-config", result)
    assert [c["name"] for c in result["checks"]] == ["config"]
    assert "is not valid TOML" in failed(result)["config"]


def test_a_config_without_a_required_key(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_of(cluster)
    config.write_text("\n".join(line for line in config.read_text().splitlines() if not line.startswith("listen")))
    status, result = check(config, capsys)
    assert status == 1
    assert failed(result) == {"config": "config needs 'listen'"}


def test_a_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, result = check(tmp_path / "nowhere.toml", capsys)
    assert status == 1
    assert "does not exist" in failed(result)["config"]


def test_a_bad_policy(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    policy = cluster.root / "host-a" / "policy.toml"
    policy.write_text('[[rule]]\nroles = ["admin"]\nvms = ["*"]\nfrom = ["host-a"]\nto = ["host-b"]\ncolour = "red"\n')
    status, result = check(config_of(cluster), capsys)
    assert status == 1
    assert set(failed(result)) == {"policy"}
    assert "colour" in failed(result)["policy"]


def test_a_missing_policy_file(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    (cluster.root / "host-a" / "policy.toml").unlink()
    status, result = check(config_of(cluster), capsys)
    assert status == 1
    assert "refuses every migration order" in failed(result)["policy"]


def test_a_crl(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.ca.revoke(cluster.ca.issue_operator("mallory", "operator", cluster.root / "mallory").certificate())
    status, result = check(config_of(cluster), capsys)
    assert status == 0, failed(result)
    assert "1 revoked" in next(c["detail"] for c in result["checks"] if c["name"] == "CRL")

    (cluster.pki / "ca.crl.pem").write_text("not a CRL\n")
    status, result = check(config_of(cluster), capsys)
    assert status == 1
    assert set(failed(result)) == {"CRL"}


def test_a_state_dir_that_is_a_file(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_of(cluster)
    blocker = cluster.root / "a-file"
    blocker.write_text("")
    config.write_text(
        config.read_text().replace(f'state_dir = "{cluster.root / "host-a"}"', f'state_dir = "{blocker}"')
    )
    status, result = check(config, capsys)
    assert status == 1
    assert failed(result) == {"state_dir": f"{blocker} is not a directory"}


def test_the_schema_names_what_a_check_prints() -> None:
    document = json.loads(
        (Path(__file__).resolve().parents[2] / "docs/schemas/agent-check-config.schema.json").read_text()
    )
    item = document["oneOf"][0]["properties"]["checks"]["items"]["properties"]
    assert list(item) == list(ConfigCheck("x", True, "").to_dict())
