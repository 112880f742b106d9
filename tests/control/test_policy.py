"""Role-based policy (T10): deny by default; auditors never migrate; strict file checking."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealift.security.errors import OrderError, PolicyDeniedError, PolicyFileError
from sealift.security.operators import Operator, Role
from sealift.security.policy import Policy

ALICE = Operator("alice", Role.ADMIN)
OLGA = Operator("olga", Role.OPERATOR)
AUDREY = Operator("audrey", Role.AUDITOR)

POLICY = """\
# web servers: operators and admins, between the a-hosts and b
[[rule]]
name = "web tier"
roles = ["admin", "operator"]
vms = ["web-*"]
from = ["host-a", "host-a?"]
to = ["host-b"]

# anything labelled tier=db: admins only, anywhere
[[rule]]
roles = ["admin"]
labels = ["tier=db"]
from = ["*"]
to = ["*"]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return Policy.load(path)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_admin_is_allowed_by_a_matching_rule(policy: Policy) -> None:
    decision = policy.authorize(ALICE, "db-1", {"tier": "db"}, "host-x", "host-y")
    assert decision.allowed and decision.rule_index == 1
    assert "allowed by rule 2 (line 10)" in decision.reason
    decision.require()  # no error


def test_operator_is_allowed_where_a_rule_says_so(policy: Policy) -> None:
    decision = policy.authorize(OLGA, "web-1", None, "HOST-A1", "host-b")
    assert decision.allowed and decision.rule_index == 0
    assert "'web tier'" in decision.reason


def test_operator_without_a_matching_rule_is_denied(policy: Policy) -> None:
    """Attack (T10): an operator orders a migration of a database VM they may not touch."""
    decision = policy.authorize(OLGA, "db-1", {"tier": "db"}, "host-a", "host-b")
    assert not decision.allowed and decision.rule_index is None
    assert "olga (operator) may not migrate VM 'db-1' from host-a to host-b" in decision.reason
    assert "deny by default" in decision.reason
    with pytest.raises(PolicyDeniedError) as caught:
        decision.require("3f2a" * 8)
    assert isinstance(caught.value, OrderError) and caught.value.code == "denied_by_policy"
    assert caught.value.order_id == "3f2a" * 8


def test_wrong_hosts_are_denied_with_the_closest_rule(policy: Policy) -> None:
    decision = policy.authorize(OLGA, "web-1", None, "host-a", "host-c")
    assert not decision.allowed
    assert "closest is rule 1 'web tier' (line 2)" in decision.reason
    assert "destination 'host-c' matches none of ['host-b']" in decision.reason


def test_labels_must_all_be_present(policy: Policy) -> None:
    assert not policy.authorize(ALICE, "db-1", {"tier": "web"}, "host-x", "host-y").allowed
    assert not policy.authorize(ALICE, "db-1", None, "host-x", "host-y").allowed


def test_auditor_is_never_allowed_to_migrate(tmp_path: Path) -> None:
    """Attack (T10): an auditor certificate signs an order; even an allow-all rule does not help."""
    everything = Policy.from_dict(
        {"rule": [{"roles": ["admin", "operator"], "vms": ["*"], "from": ["*"], "to": ["*"]}]}
    )
    assert everything.authorize(ALICE, "x", None, "a", "b").allowed
    decision = everything.authorize(AUDREY, "x", None, "a", "b")
    assert not decision.allowed and "auditors may never migrate" in decision.reason
    with pytest.raises(PolicyFileError, match="rule 1 .*auditors may never migrate"):
        Policy.load(_write(tmp_path, '[[rule]]\nroles=["auditor"]\nvms=["*"]\nfrom=["*"]\nto=["*"]\n'))


def test_empty_policy_denies_everything(tmp_path: Path) -> None:
    for policy in (Policy.load(_write(tmp_path, "# nothing yet\n")), Policy.deny_all(), Policy.from_dict({})):
        decision = policy.authorize(ALICE, "web-1", None, "host-a", "host-b")
        assert not decision.allowed
        assert "deny by default" in decision.reason and "has no rules" in decision.reason


def test_unknown_key_is_an_error_naming_rule_and_line(tmp_path: Path) -> None:
    text = POLICY + '\n[[rule]]\nroles = ["admin"]\nvms = ["*"]\nform = ["host-a"]\nto = ["host-b"]\n'
    with pytest.raises(PolicyFileError) as caught:
        Policy.load(_write(tmp_path, text))
    message = str(caught.value)
    assert "rule 3 (line 16)" in message
    assert "unknown key 'form' (did you mean 'from'?)" in message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[[rule]]\nroles=["admin"]\nfrom=["*"]\nto=["*"]\n', "say which VMs"),
        ('[[rule]]\nroles=["admin"]\nvms=["*"]\nto=["*"]\n', "missing required key 'from'"),
        ('[[rule]]\nroles=[]\nvms=["*"]\nfrom=["*"]\nto=["*"]\n', "'roles' must be a non-empty list"),
        ('[[rule]]\nroles=["root"]\nvms=["*"]\nfrom=["*"]\nto=["*"]\n', "unknown role 'root'"),
        ('[[rule]]\nroles=["admin"]\nvms="*"\nfrom=["*"]\nto=["*"]\n', "'vms' must be a non-empty list"),
        ('[[rule]]\nroles=["admin"]\nlabels=["tier"]\nfrom=["*"]\nto=["*"]\n', "not of the form key=value"),
        ("allow_all = true\n", "unknown top-level key"),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_policy_file_is_checked_strictly(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(PolicyFileError, match=match):
        Policy.load(_write(tmp_path, text))


def test_missing_policy_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="does not exist"):
        Policy.load(tmp_path / "nowhere.toml")
