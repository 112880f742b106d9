"""`sealift agent --check-config`: is this host ready to run an agent? Checked without starting one.

Each check reads what the agent reads at start (host/config.py, the identity
of security/identity.py, the policy, the CRL, its directories) and says in
one line what it found or what to fix. Unlike the agent, which stops at the
first problem, every check runs, so that one pass shows everything wrong;
and it is stricter in one place: a policy file that is named but missing is
an error here (the agent would start and refuse every migration).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from sealift.host.config import AgentConfig, ConfigError, load_config
from sealift.security.certificates import is_ca, iso, load_certificate, load_private_key, utc_now
from sealift.security.errors import SecurityError
from sealift.security.identity import HostIdentity, host_name_of, validate_hostname
from sealift.security.policy import Policy
from sealift.security.revocation import RevocationList


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def check_agent_config(path: Path) -> list[Check]:
    """Every check of the agent config at `path`; only the first if the file itself does not load."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [Check("config", False, str(exc))]
    listen = f"{config.listen[0]}:{config.listen[1]}"
    checks = [Check("config", True, f"{path}: host {config.name}, migration port {listen}")]
    identity = HostIdentity.in_directory(config.identity_dir, config.name)
    ca_check, ca = _ca_certificate(identity.ca_path)
    checks += [
        _run("host name", lambda: _host_name(config.name)),
        _run("host key", lambda: _host_key(identity.key_path)),
        _run("host certificate", lambda: _host_certificate(identity.cert_path, config.name)),
        ca_check,
    ]
    if all(c.ok for c in checks):
        checks.append(_run("identity", lambda: _identity(identity)))
    else:
        checks.append(Check("identity", False, "not checked: fix the identity files above first"))
    checks += [
        _run("policy", lambda: _policy(config)),
        _crl(config, ca),
        _directory("state_dir", config.state_dir),
        _directory("vm_dir", config.vm_dir),
        _directory("control socket directory", config.control_socket.parent),
    ]
    return checks


def _run(name: str, check: Callable[[], str]) -> Check:
    """One check: its detail if it passes, the error's message if not."""
    try:
        return Check(name, True, check())
    except (SecurityError, ConfigError, OSError) as exc:
        return Check(name, False, str(exc))


def _host_name(name: str) -> str:
    validate_hostname(name)  # stricter than the config's: it is also a file name in identity_dir
    return f"{name}: a valid host name"


def _host_key(path: Path) -> str:
    load_private_key(path)  # readable, mode 0600, ECC P-256
    return f"{path}: ECC P-256, readable by its owner only"


def _host_certificate(path: Path, name: str) -> str:
    cert = load_certificate(path)
    named = host_name_of(cert)
    if named != name:
        raise ConfigError(f"{path} was issued for {named!r}, but the config names this host {name!r}")
    return f"{path}: host certificate for {named}"


def _ca_certificate(path: Path) -> tuple[Check, x509.Certificate | None]:
    """The CA check, and the CA certificate the CRL check needs (None if it did not load)."""
    try:
        ca = load_certificate(path)
    except SecurityError as exc:
        return Check("CA certificate", False, str(exc)), None
    if not is_ca(ca):
        return Check("CA certificate", False, f"{path} is not a CA certificate"), None
    return Check("CA certificate", True, f"{path}: {ca.subject.rfc4514_string()}"), ca


def _identity(identity: HostIdentity) -> str:
    identity.check()  # the key is the certificate's, the CA issued it, it is valid now
    expires = identity.certificate().not_valid_after_utc
    days = (expires - utc_now()).days
    return f"key matches the certificate, issued by the cluster CA, valid until {iso(expires)} ({days} days)"


def _policy(config: AgentConfig) -> str:
    if config.policy_path is None:
        return "no policy file configured: the agent will refuse every migration order"
    if not config.policy_path.exists():
        raise ConfigError(
            f"policy file {config.policy_path} does not exist: create it, or the agent refuses every migration order"
        )
    policy = Policy.load(config.policy_path)
    return f"{config.policy_path}: {len(policy.rules)} rule(s)"


def _crl(config: AgentConfig, ca: x509.Certificate | None) -> Check:
    path = config.crl_path
    if path is None:
        return Check("CRL", True, "none configured: revocation is not checked")
    if not path.exists() and path == config.identity_dir / "ca.crl.pem":
        return Check("CRL", True, f"none at {path} (the default place): revocation is not checked")
    if ca is None:
        return Check("CRL", False, f"{path}: not checked without a readable CA certificate")
    try:
        crl = RevocationList.load(path, ca)
    except SecurityError as exc:
        return Check("CRL", False, str(exc))
    next_update = iso(crl.next_update) if crl.next_update else "-"
    return Check("CRL", True, f"{path}: {len(crl.entries)} revoked, next update {next_update}")


def _directory(name: str, path: Path) -> Check:
    """A directory the agent writes in: there and writable, or creatable (the agent makes it at start)."""
    if path.exists():
        if not path.is_dir():
            return Check(name, False, f"{path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            return Check(name, False, f"{path} is not writable by this user (uid {os.geteuid()})")
        return Check(name, True, f"{path}: writable")
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return Check(name, False, f"{path} does not exist and {parent} is not writable: create it")
    return Check(name, True, f"{path}: does not exist yet; the agent creates it")
