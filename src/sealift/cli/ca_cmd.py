"""`sealift ca`: the cluster certificate authority (create it, issue host and operator certificates, revoke)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sealift.cli.common import report


def add_ca_parser(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="the cluster certificate authority").add_subparsers(dest="ca_command", required=True)
    p = ca.add_parser("init", help="create a cluster CA (ECC P-256)")
    p.add_argument("--dir", required=True)
    p.add_argument("--name", default="sealift cluster CA")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ca_init)
    p = ca.add_parser("issue", help="issue a host certificate")
    p.add_argument("host")
    _add_issue_flags(p, "host")
    p.set_defaults(func=cmd_ca_issue)
    p = ca.add_parser("operator", help="issue an operator certificate with a role")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["admin", "operator", "auditor"])
    _add_issue_flags(p, "operator's")
    p.set_defaults(func=cmd_ca_operator)
    p = ca.add_parser("revoke", help="revoke a host or operator certificate (updates ca.crl.pem)")
    p.add_argument("certificate", help="the certificate file to revoke")
    p.add_argument("--dir", required=True, help="the CA directory")
    p.add_argument("--reason", default="key_compromise")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ca_revoke)


def _add_issue_flags(p: argparse.ArgumentParser, whose: str) -> None:
    """The flags `ca issue` and `ca operator` share: the CA, where the new key goes, how long it is valid."""
    p.add_argument("--dir", required=True, help="the CA directory")
    p.add_argument("--out", help=f"where to write the {whose} key and certificate (default: the CA directory)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--json", action="store_true")


def cmd_ca_init(args: argparse.Namespace) -> int:
    from sealift.security.identity import ClusterCA

    ca = ClusterCA.init(Path(args.dir), name=args.name)
    info = {
        "ca_dir": str(Path(args.dir).resolve()),
        "certificate": str(Path(args.dir, "ca.pem").resolve()),
        "name": args.name,
    }
    return report(args, info, f"[green]cluster CA created[/green] in {info['ca_dir']} ({ca.__class__.__name__})")


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from sealift.security.identity import ClusterCA

    ca = ClusterCA.load(Path(args.dir))
    out_dir = Path(args.out or args.dir)
    identity = ca.issue_host(args.host, out_dir, days=args.days)
    info = {
        "host": args.host,
        "certificate": str(identity.cert_path),
        "key": str(identity.key_path),
        "ca": str(identity.ca_path),
    }
    return report(args, info, f"[green]issued[/green] host certificate for {args.host}: {identity.cert_path}")


def cmd_ca_operator(args: argparse.Namespace) -> int:
    from sealift.security.identity import ClusterCA

    ca = ClusterCA.load(Path(args.dir))
    identity = ca.issue_operator(args.name, args.role, Path(args.out or args.dir), days=args.days)
    info = {
        "operator": args.name,
        "role": args.role,
        "certificate": str(identity.cert_path),
        "key": str(identity.key_path),
    }
    return report(
        args,
        info,
        f"[green]issued[/green] operator certificate for {args.name} (role {args.role}): {identity.cert_path}",
    )


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    from cryptography import x509

    from sealift.security.identity import ClusterCA

    ca = ClusterCA.load(Path(args.dir))
    cert_path = Path(args.certificate)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    crl = ca.revoke(cert, args.reason)
    info = {
        "revoked": str(cert_path),
        "serial": f"{cert.serial_number:x}",
        "crl": str(Path(args.dir) / "ca.crl.pem"),
        "entries": len(list(crl)),
    }
    return report(
        args,
        info,
        f"[yellow]revoked[/yellow] {cert_path} (serial {info['serial']}); "
        f"copy {info['crl']} to every agent's identity_dir (running agents apply it within a second)",
    )
