"""Live revocation without agents: the authority reloads its CRL and policy, and stops what relies on the revoked.

A new file takes effect; a bad one (unreadable, forged, older, gone) is
refused and audited, and the one in force stays. Migrations under way are
re-checked against every newly loaded CRL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealift.host.config import AgentConfig
from sealift.migration.authority import Authority
from sealift.security.audit import Kinds
from sealift.security.errors import CertificateRevokedError
from sealift.security.identity import ClusterCA, HostIdentity
from sealift.security.operators import Operator, Role
from sealift.security.reload import FileStamp, InFlightTrust

POLICY = '[[rule]]\nroles = ["admin"]\nvms = ["*"]\nfrom = ["host-a"]\nto = ["host-b"]\n'
ADMIN = Operator("alice", Role.ADMIN)


@dataclass(frozen=True)
class Site:
    ca: ClusterCA
    authority: Authority
    crl_path: Path
    policy_path: Path
    host_b: HostIdentity
    host_c: HostIdentity

    def kinds(self, kind: str) -> list[dict]:
        return [dict(entry.fields) for entry in self.authority.audit.show(kind=kind)]

    def allowed(self) -> bool:
        return self.authority.policy.authorize(ADMIN, "vm1", None, "host-a", "host-b").allowed


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    ca = ClusterCA.init(tmp_path / "ca")
    pki = tmp_path / "pki"
    ca.issue_host("host-a", pki)
    host_b = ca.issue_host("host-b", tmp_path / "b")
    host_c = ca.issue_host("host-c", tmp_path / "c")
    ca.publish_crl()  # number 1, nobody revoked
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(POLICY)
    config = AgentConfig(
        name="host-a",
        listen=("127.0.0.1", 0),
        control_socket=tmp_path / "control.sock",
        state_dir=tmp_path / "state",
        vm_dir=tmp_path / "vms",
        identity_dir=pki,
        policy_path=policy_path,
        crl_path=tmp_path / "ca" / "ca.crl.pem",
    )
    (tmp_path / "state").mkdir()
    authority = Authority(config, HostIdentity.load(pki, "host-a"))
    yield Site(ca, authority, tmp_path / "ca" / "ca.crl.pem", policy_path, host_b, host_c)
    authority.close()


def test_a_new_crl_takes_effect_and_is_audited(site: Site) -> None:
    site.authority.check_peer(site.host_c.certificate(), "host-c")
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    site.authority.reload(trigger="sighup")
    with pytest.raises(CertificateRevokedError):
        site.authority.check_peer(site.host_c.certificate(), "host-c")
    site.authority.check_peer(site.host_b.certificate(), "host-b")  # others still pass
    (reloaded,) = site.kinds(Kinds.CRL_RELOADED)
    assert reloaded["number"] == 2 and reloaded["entries"] == 1 and reloaded["trigger"] == "sighup"
    assert len(reloaded["sha256"]) == 64


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda path: path.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"), id="garbage"
        ),
        pytest.param(lambda path: path.write_bytes(path.read_bytes().replace(b"A", b"B", 1)), id="altered"),
        pytest.param(lambda path: path.unlink(), id="deleted"),
    ],
)
def test_a_bad_new_crl_is_refused_and_the_old_one_stays(site: Site, damage) -> None:
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    site.authority.reload()
    damage(site.crl_path)
    site.authority.reload()
    assert site.authority.revocations.number == 2
    with pytest.raises(CertificateRevokedError):  # never falls open
        site.authority.check_peer(site.host_c.certificate(), "host-c")
    (refused,) = site.kinds(Kinds.CRL_REFUSED)
    assert refused["code"] == "crl_error" and str(site.crl_path) in refused["reason"]


def test_a_crl_from_another_ca_is_refused(site: Site, tmp_path: Path) -> None:
    other = ClusterCA.init(tmp_path / "other")
    other.publish_crl()
    site.crl_path.write_bytes((tmp_path / "other" / "ca.crl.pem").read_bytes())
    site.authority.reload()
    assert site.authority.revocations.number == 1 and site.authority.revocations.enabled
    assert "not signed by this cluster's CA" in site.kinds(Kinds.CRL_REFUSED)[0]["reason"]


def test_an_older_crl_cannot_roll_a_revocation_back(site: Site) -> None:
    before = site.crl_path.read_bytes()  # number 1: host-c not revoked yet
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    site.authority.reload()
    site.crl_path.write_bytes(before)  # validly signed, still current, but older
    site.authority.reload()
    assert site.authority.revocations.number == 2
    assert site.authority.revocations.is_revoked(site.host_c.certificate())
    assert "older than number 2" in site.kinds(Kinds.CRL_REFUSED)[0]["reason"]


def test_a_policy_with_a_syntax_error_is_refused_and_a_valid_one_takes_effect(site: Site) -> None:
    assert site.allowed()
    site.policy_path.write_text(POLICY + "[[rule]\n")
    site.authority.reload()
    assert site.allowed()  # the previous policy stays
    (refused,) = site.kinds(Kinds.POLICY_REFUSED)
    assert refused["code"] == "policy_file_error" and "not valid TOML" in refused["reason"]
    site.policy_path.write_text(POLICY.replace('to = ["host-b"]', 'to = ["host-x"]'))
    site.authority.reload()
    assert not site.allowed()
    reloaded = site.kinds(Kinds.POLICY_RELOADED)[-1]
    assert reloaded["rules"] == 1 and len(reloaded["sha256"]) == 64


def test_a_deleted_policy_denies_everything(site: Site) -> None:
    site.policy_path.unlink()
    site.authority.reload()
    assert not site.allowed()
    assert site.kinds(Kinds.POLICY_RELOADED)[-1]["note"] == "no policy file: deny all"


def test_a_poll_reloads_only_what_changed(site: Site) -> None:
    site.authority.reload(only_changed=True)
    assert not site.kinds(Kinds.CRL_RELOADED) and not site.kinds(Kinds.POLICY_RELOADED)
    site.ca.revoke(site.host_c.certificate())  # renamed over the old file: a new inode
    site.authority.reload(only_changed=True, trigger="file changed")
    assert site.kinds(Kinds.CRL_RELOADED)[0]["trigger"] == "file changed"
    assert not site.kinds(Kinds.POLICY_RELOADED)


def test_file_stamps_tell_an_edit_in_place_apart(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert FileStamp.of(path) is None and FileStamp.of(None) is None
    path.write_text("one")
    first = FileStamp.of(path)
    assert FileStamp.of(path) == first
    path.write_text("two!")
    assert FileStamp.of(path) != first


def test_a_migration_under_way_is_marked_when_its_peer_is_revoked(site: Site) -> None:
    to_c, to_b = InFlightTrust("m-to-c"), InFlightTrust("m-to-b")
    site.authority.rely_on(to_c, "host certificate of host-c", site.host_c.certificate())
    site.authority.rely_on(to_b, "host certificate of host-b", site.host_b.certificate())
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    site.authority.reload()
    with pytest.raises(
        CertificateRevokedError, match="migration m-to-c stopped before its commit decision: host certificate of host-c"
    ):
        to_c.check()
    to_b.check()
    site.authority.final_check(to_b)  # passes, and from now on later CRLs leave it be
    (stopped,) = site.kinds(Kinds.MIGRATION_REVOKED)
    assert stopped["migration_id"] == "m-to-c" and stopped["code"] == "certificate_revoked"
    # The order in the log: the reload, then what it stopped.
    kinds = [entry.kind for entry in site.authority.audit.show()]
    assert kinds.index(Kinds.CRL_RELOADED) < kinds.index(Kinds.MIGRATION_REVOKED)
    site.ca.revoke(site.host_b.certificate(), "key_compromise")
    site.authority.reload()
    to_b.check()  # past its commit decision: nothing changes
    assert len(site.kinds(Kinds.MIGRATION_REVOKED)) == 1


def test_a_migration_cannot_come_to_rely_on_a_revoked_certificate(site: Site) -> None:
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    site.authority.reload()
    with pytest.raises(CertificateRevokedError):
        site.authority.rely_on(InFlightTrust("m"), "host certificate of host-c", site.host_c.certificate())


def test_the_watcher_reloads_a_changed_file_and_at_once_on_request(site: Site) -> None:
    site.authority.start_watching(interval_s=0.05)
    site.ca.revoke(site.host_c.certificate(), "key_compromise")
    deadline = time.monotonic() + 5
    while not site.authority.revocations.is_revoked(site.host_c.certificate()):
        assert time.monotonic() < deadline, "the changed CRL was not picked up"
        time.sleep(0.02)
    assert site.kinds(Kinds.CRL_RELOADED)[-1]["trigger"] == "file changed"


def test_a_reload_request_is_served_at_once(site: Site) -> None:
    """SIGHUP's path: the watcher polls only every minute here, the request wakes it."""
    site.authority.start_watching(interval_s=60)
    site.authority.request_reload()
    deadline = time.monotonic() + 5
    while not site.kinds(Kinds.POLICY_RELOADED):
        assert time.monotonic() < deadline, "the requested reload did not happen"
        time.sleep(0.02)
    assert site.kinds(Kinds.CRL_RELOADED)[-1]["trigger"] == "sighup"
