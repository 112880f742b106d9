"""The `sealift` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sealift import __version__
from sealift.agent.client import AgentClient, AgentRequestFailed, AgentUnavailable
from sealift.security.errors import SecurityError
from sealift.agent.config import ConfigError, load_config, parse_size
from sealift.cli.render import MigrationProgress, console, out, report_table, vm_table

DEFAULT_CONFIG = Path("/etc/sealift/agent.toml")


class CliError(Exception):
    """Something the operator can fix; printed without a traceback."""


# -- helpers ----------------------------------------------------------------


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    if os.environ.get("SEALIFT_SOCKET"):
        return Path(os.environ["SEALIFT_SOCKET"])
    config_path = Path(args.config) if getattr(args, "config", None) else DEFAULT_CONFIG
    if not config_path.exists():
        raise CliError(f"no agent config at {config_path}: pass --config FILE or --socket PATH (or set SEALIFT_SOCKET)")
    return load_config(config_path).control_socket


def _client(args: argparse.Namespace) -> AgentClient:
    return AgentClient(_socket_path(args))


def _add_agent_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"agent config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--socket", help="agent control socket (overrides --config)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _add_operator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--operator", help="operator name (default $SEALIFT_OPERATOR)")
    parser.add_argument(
        "--operator-dir", help="directory with NAME.key/NAME.pem (default $SEALIFT_OPERATOR_DIR or /etc/sealift/operator)"
    )


def _operator(args: argparse.Namespace):  # -> OperatorIdentity
    from sealift.security.operators import OperatorIdentity

    name = args.operator or os.environ.get("SEALIFT_OPERATOR")
    directory = Path(args.operator_dir or os.environ.get("SEALIFT_OPERATOR_DIR", "/etc/sealift/operator"))
    if not name:
        raise CliError("which operator signs? pass --operator NAME (and --operator-dir) or set SEALIFT_OPERATOR")
    return OperatorIdentity.load(directory, name)


def _parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


# -- commands -----------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    from sealift.agent.daemon import Agent

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Agent(load_config(Path(args.config))).serve_forever()
    return 0


def cmd_ca_init(args: argparse.Namespace) -> int:
    from sealift.security.identity import ClusterCA

    ca = ClusterCA.init(Path(args.dir), name=args.name)
    info = {"ca_dir": str(Path(args.dir).resolve()), "certificate": str(Path(args.dir, "ca.pem").resolve()), "name": args.name}
    if args.json:
        _print_json(info)
    else:
        out.print(f"[green]cluster CA created[/green] in {info['ca_dir']} ({ca.__class__.__name__})")
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from sealift.security.identity import ClusterCA

    ca = ClusterCA.load(Path(args.dir))
    out_dir = Path(args.out or args.dir)
    identity = ca.issue_host(args.host, out_dir, days=args.days)
    info = {"host": args.host, "certificate": str(identity.cert_path), "key": str(identity.key_path), "ca": str(identity.ca_path)}
    if args.json:
        _print_json(info)
    else:
        out.print(f"[green]issued[/green] host certificate for {args.host}: {identity.cert_path}")
    return 0


def cmd_ca_operator(args: argparse.Namespace) -> int:
    from sealift.security.identity import ClusterCA

    ca = ClusterCA.load(Path(args.dir))
    identity = ca.issue_operator(args.name, args.role, Path(args.out or args.dir), days=args.days)
    info = {"operator": args.name, "role": args.role, "certificate": str(identity.cert_path), "key": str(identity.key_path)}
    if args.json:
        _print_json(info)
    else:
        out.print(f"[green]issued[/green] operator certificate for {args.name} (role {args.role}): {identity.cert_path}")
    return 0


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    from cryptography import x509

    from sealift.security.identity import ClusterCA

    ca = ClusterCA.load(Path(args.dir))
    cert_path = Path(args.certificate)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    crl = ca.revoke(cert, args.reason)
    info = {"revoked": str(cert_path), "serial": f"{cert.serial_number:x}", "crl": str(Path(args.dir) / "ca.crl.pem"),
            "entries": len(list(crl))}
    if args.json:
        _print_json(info)
    else:
        out.print(f"[yellow]revoked[/yellow] {cert_path} (serial {info['serial']}); copy {info['crl']} to every agent's identity_dir")
    return 0


def cmd_order_create(args: argparse.Namespace) -> int:
    from sealift.security.orders import create_order, describe_order

    envelope = create_order(_operator(args), args.vm, args.source, args.to, ttl_s=_parse_duration(args.ttl))
    if args.out:
        Path(args.out).write_text(envelope)
    if args.json or not args.out:
        sys.stdout.write(envelope + "\n") if not args.json else _print_json(describe_order(envelope))
    else:
        order = describe_order(envelope)
        out.print(f"[green]order {order['order_id']}[/green]: {args.vm} {args.source} → {args.to}, expires {order['expires']} → {args.out}")
    return 0


def cmd_place(args: argparse.Namespace) -> int:
    placement = _client(args).request("place", vm=args.vm)["placement"]
    if args.json:
        _print_json(placement)
        return 0
    from rich.table import Table

    table = Table(title=f"placement of {args.vm}: {placement['host']}")
    for col in ("host", "eligible", "believed free", "penalty", "reason"):
        table.add_column(col)
    for a in placement["assessments"]:
        table.add_row(a["host"], "yes" if a["eligible"] else "no", f"{a['effective_free'] >> 20} MiB",
                      f"{a['penalty']:.2f}", a["reason"])
    out.print(table)
    return 0


def cmd_psk_provision(args: argparse.Namespace) -> int:
    from sealift.security.psk import new_psk, psk_to_hex

    key = args.key or psk_to_hex(new_psk())
    reply = _client(args).request("psk.provision", peer=args.peer, key=key)
    result = {"peer": args.peer, "fingerprint": reply["fingerprint"]}
    if not args.key:
        result["key"] = key  # generated here: give the same key to the peer, then forget it
    if args.json:
        _print_json(result)
    else:
        out.print(f"PSK for {args.peer} provisioned (fingerprint {reply['fingerprint']})")
        if not args.key:
            out.print(f"provision the same key on {args.peer}: sealift psk provision <this host> --key {key}")
    return 0


def cmd_psk_status(args: argparse.Namespace) -> int:
    peers = _client(args).request("psk.status")["peers"]
    if args.json:
        _print_json(peers)
    else:
        for p in peers:
            out.print(f"{p['peer']}: epoch {p['epoch']}, fingerprint {p['fingerprint']}"
                      f"{', pending ratchet' if p['has_pending'] else ''}")
    return 0


def cmd_order_show(args: argparse.Namespace) -> int:
    from sealift.security.orders import describe_order

    order = describe_order(Path(args.file).read_text())
    if args.json:
        _print_json(order)
    else:
        for key, value in order.items():
            out.print(f"[bold]{key}[/bold]: {value}")
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    entries = _client(args).request("audit.show", limit=args.limit, kind=args.kind)["entries"]
    if args.json:
        _print_json(entries)
        return 0
    from rich.table import Table

    table = Table(title="audit log")
    for col in ("seq", "time", "kind", "fields"):
        table.add_column(col)
    for entry in entries:
        fields = {k: v for k, v in (entry.get("fields") or {}).items() if k not in ("receipt", "manifest")}
        table.add_row(str(entry.get("seq")), str(entry.get("time", entry.get("timestamp", ""))), str(entry.get("kind")),
                      json.dumps(fields)[:120])
    out.print(table)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.file:
        from cryptography import x509

        from sealift.security.audit import verify_export

        key = x509.load_pem_x509_certificate(Path(args.certificate).read_bytes()).public_key()
        with open(args.file) as lines:
            result = verify_export(lines, key)
        verification = {"ok": result.ok, "entries": result.entries,
                        "problems": [{"seq": p.seq, "what": p.what} for p in result.problems]}
    else:
        verification = _client(args).request("audit.verify")["verification"]
    if args.json:
        _print_json(verification)
    elif verification["ok"]:
        out.print(f"[green]audit log intact[/green]: {verification['entries']} entries, chain and signatures verify")
    else:
        out.print(f"[bold red]audit log TAMPERED[/bold red]: {len(verification['problems'])} problem(s)")
        for problem in verification["problems"]:
            out.print(f"  entry #{problem['seq']}: {problem['what']}")
    return 0 if verification["ok"] else 1


def cmd_vm_start(args: argparse.Namespace) -> int:
    fields: dict[str, object] = {"backend": args.backend}
    if args.image is not None:
        fields["image_cache"] = str(Path(args.image).resolve())
    reply = _client(args).request(
        "vm.start", name=args.name, memory=args.memory, workload=args.workload, fill_fraction=args.fill, **fields
    )
    if args.json:
        _print_json(reply["vm"])
    else:
        out.print(vm_table([reply["vm"]]))
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    reply = _client(args).request("vm.list")
    if args.json:
        _print_json(reply["vms"])
    else:
        out.print(vm_table(reply["vms"]))
    return 0


def cmd_vm_info(args: argparse.Namespace) -> int:
    reply = _client(args).request("vm.info", name=args.name)
    if args.json:
        _print_json(reply["vm"])
    else:
        out.print(vm_table([reply["vm"]]))
    return 0


def cmd_vm_check(args: argparse.Namespace) -> int:
    check = _client(args).request("vm.check", name=args.name)["check"]
    ok = check["bad_page_count"] == 0 and check["secret_intact"]
    if args.json:
        _print_json({**check, "ok": ok})
    else:
        color = "green" if ok else "red"
        out.print(
            f"[{color}]{args.name}: {check['pages_checked']} pages checked, {check['bad_page_count']} bad, "
            f"secret {'intact' if check['secret_intact'] else 'ALTERED'}[/{color}]"
        )
    return 0 if ok else 1


def cmd_vm_stop(args: argparse.Namespace) -> int:
    _client(args).request("vm.stop", name=args.name)
    if args.json:
        _print_json({"stopped": args.name})
    else:
        out.print(f"stopped {args.name}")
    return 0


def migration_options(args: argparse.Namespace) -> dict[str, object]:
    options: dict[str, object] = {"secure": not args.insecure}
    if args.downtime_ms is not None:
        options["downtime_limit_ms"] = args.downtime_ms
    if args.bandwidth is not None:
        options["bandwidth_limit_bps"] = parse_size(args.bandwidth)
    if args.max_rounds is not None:
        options["max_rounds"] = args.max_rounds
    if args.compression is not None:
        options["compression"] = None if args.compression == "none" else args.compression
    if args.auto_converge:
        options["auto_converge"] = True
    if args.no_zero_elision:
        options["zero_page_elision"] = False
    if args.image_digest is not None:
        options["image_digest"] = args.image_digest
    if args.transport is not None:
        options["transport"] = args.transport
    if args.multifd_channels:
        options["multifd_channels"] = args.multifd_channels
    if args.xbzrle:
        options["xbzrle"] = True
    if args.xbzrle_cache is not None:
        options["xbzrle_cache_bytes"] = parse_size(args.xbzrle_cache)
    if args.completion_timeout is not None:
        options["completion_timeout_s"] = args.completion_timeout
    return options


def add_migration_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--downtime-ms", type=int, help="downtime budget for stop-and-copy (default 300)")
    parser.add_argument("--bandwidth", help="bandwidth limit per second, e.g. 200M (default unlimited)")
    parser.add_argument("--max-rounds", type=int, help="maximum pre-copy rounds (default 30)")
    parser.add_argument("--compression", choices=["zstd", "lz4", "none"], help="compress page data (default none)")
    parser.add_argument("--auto-converge", action="store_true", help="throttle a guest that dirties faster than the link")
    parser.add_argument("--completion-timeout", type=float, metavar="SECONDS",
                        help="QEMU guests: cancel a pre-copy not at its switchover after this long; the guest "
                             "keeps running on the source (default: no limit, as in QEMU)")
    parser.add_argument("--no-zero-elision", action="store_true", help="send zero pages too")
    parser.add_argument(
        "--image-digest", choices=["tags", "blake3"],
        help="end-to-end image check (default tags: AES-GCM tags and a page map; blake3 hashes every page, slower)",
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext baseline: NO encryption or authentication")
    qemu = parser.add_argument_group("QEMU guests")
    qemu.add_argument(
        "--transport", choices=["sealift", "qemu-tls", "ipsec", "plain", "sealift-plain"],
        help="how QEMU's stream travels: sealift (the agents' channel, default), qemu-tls (QEMU's native TLS "
        "with the hosts' cluster certificates), ipsec (QEMU's TCP inside a per-migration strongSwan IPsec SA), "
        "plain or sealift-plain (in clear: need --insecure)",
    )
    qemu.add_argument("--multifd-channels", type=int, default=0, metavar="N",
                      help="QEMU multifd with N parallel connections (every transport; at most 16 through the agents)")
    qemu.add_argument("--xbzrle", action="store_true", help="QEMU's XBZRLE delta compression of re-sent pages")
    qemu.add_argument("--xbzrle-cache", metavar="SIZE", help="XBZRLE cache size, e.g. 256M (default QEMU's 64M)")


def warn_insecure() -> None:
    console.print(
        "[bold red]WARNING: --insecure sends the VM's memory in clear, without authentication. "
        "Use it only to measure the baseline or in the lab.[/bold red]"
    )


def _order_for(args: argparse.Namespace, client: AgentClient) -> tuple[str, str, str]:
    """The signed order to run, with its VM and destination: from --order, or signed now."""
    from sealift.security.orders import create_order, describe_order

    if args.order:
        envelope = Path(args.order).read_text()
        order = describe_order(envelope)
        if args.vm and args.vm != order.get("vm"):
            raise CliError(f"the order is for VM {order.get('vm')!r}, not {args.vm!r}")
        return envelope, str(order.get("vm")), str(order.get("destination"))
    if not args.vm or not args.to:
        raise CliError("name the VM and --to HOST, or pass --order FILE")
    if args.to == "auto":
        placement = client.request("place", vm=args.vm)["placement"]
        console.print(f"placement: {args.vm} → [bold]{placement['host']}[/bold] ({placement['reason']})")
        args.to = placement["host"]
    source = client.request("status")["status"]["host"]
    return create_order(_operator(args), args.vm, source, args.to, ttl_s=_parse_duration(args.ttl)), args.vm, args.to


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.insecure:
        warn_insecure()
    client = _client(args)
    order, vm, destination = _order_for(args, client)
    args.vm, args.to = vm, destination
    with MigrationProgress(args.vm, args.to, enabled=not args.json) as progress:
        try:
            reply = client.request(
                "migrate", on_event=progress.on_event, vm=args.vm, to=args.to, options=migration_options(args), order=order
            )
        except AgentRequestFailed as exc:
            if args.json:
                _print_json({"status": "failed", "error": str(exc)})
                return 1
            raise CliError(str(exc)) from None
    report = reply["report"]
    if args.json:
        _print_json(report)
    else:
        out.print(report_table(report))
    return 0 if report.get("status") == "completed" else 1


def cmd_migrations(args: argparse.Namespace) -> int:
    records = _client(args).request("migrations", limit=args.limit)["migrations"]
    if args.json:
        _print_json(records)
        return 0
    from rich.table import Table

    table = Table(title="migrations")
    for col in ("id", "vm", "role", "peer", "phase", "error"):
        table.add_column(col)
    for r in records:
        table.add_row(r["id"][:12], r["vm"], r["role"], r["peer"], r["phase"], (r.get("error") or "")[:60])
    out.print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).request("status")["status"]
    if args.json:
        _print_json(status)
    else:
        for key, value in status.items():
            out.print(f"[bold]{key}[/bold]: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sealift.demo import DemoOptions, run_demo

    if args.insecure:
        warn_insecure()
    result = run_demo(
        DemoOptions(
            memory=args.memory,
            workload=args.workload,
            insecure=args.insecure,
            show_progress=not args.json,
            keep=args.keep,
            migration=migration_options(args),
            backend=args.backend,
        )
    )
    if args.json:
        _print_json(result)
    return 0 if result.get("status") == "completed" else 1


# -- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sealift", description="Secure live migration of virtual machines.")
    parser.add_argument("--version", action="version", version=f"sealift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("agent", help="run the per-host agent")
    p.add_argument("--config", required=True, help="agent config file (TOML)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_agent)

    ca = sub.add_parser("ca", help="the cluster certificate authority").add_subparsers(dest="ca_command", required=True)
    p = ca.add_parser("init", help="create a cluster CA (ECC P-256)")
    p.add_argument("--dir", required=True)
    p.add_argument("--name", default="sealift cluster CA")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ca_init)
    p = ca.add_parser("issue", help="issue a host certificate")
    p.add_argument("host")
    p.add_argument("--dir", required=True, help="the CA directory")
    p.add_argument("--out", help="where to write the host key and certificate (default: the CA directory)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ca_issue)
    p = ca.add_parser("operator", help="issue an operator certificate with a role")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["admin", "operator", "auditor"])
    p.add_argument("--dir", required=True, help="the CA directory")
    p.add_argument("--out", help="where to write the operator's key and certificate (default: the CA directory)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ca_operator)
    p = ca.add_parser("revoke", help="revoke a host or operator certificate (updates ca.crl.pem)")
    p.add_argument("certificate", help="the certificate file to revoke")
    p.add_argument("--dir", required=True, help="the CA directory")
    p.add_argument("--reason", default="key_compromise")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ca_revoke)

    vm = sub.add_parser("vm", help="manage VMs on an agent").add_subparsers(dest="vm_command", required=True)
    p = vm.add_parser("start", help="start a VM (built-in, or a real QEMU guest)")
    p.add_argument("name")
    p.add_argument("--backend", default="builtin", choices=["builtin", "qemu"],
                   help="builtin (default) or qemu (the test guest image, built on first use)")
    p.add_argument("--image", default=None, help="QEMU guest image cache directory (default: the agent's)")
    p.add_argument("--memory", default="256M", help="RAM size, e.g. 256M, 1G, 4G (default 256M)")
    p.add_argument("--workload", default="db", choices=["idle", "web", "db", "stress"])
    p.add_argument("--fill", type=float, default=0.5, help="share of RAM filled with data at boot (default 0.5)")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_vm_start)
    for name, func, helptext in (
        ("info", cmd_vm_info, "show one VM"),
        ("check", cmd_vm_check, "verify a VM's memory from inside (pages and secret)"),
        ("stop", cmd_vm_stop, "stop a VM and delete its image"),
    ):
        p = vm.add_parser(name, help=helptext)
        p.add_argument("name")
        _add_agent_flags(p)
        p.set_defaults(func=func)
    p = vm.add_parser("list", help="list VMs")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_vm_list)

    p = sub.add_parser("migrate", help="live-migrate a VM to another host (under a signed order)")
    p.add_argument("vm", nargs="?")
    p.add_argument("--to", help="destination host name (from the agent's [peers]), or 'auto' to place it")
    p.add_argument("--order", help="run this signed order (from `sealift order create`)")
    p.add_argument("--ttl", default="5m", help="lifetime of the order signed in one step (default 5m)")
    add_migration_flags(p)
    _add_agent_flags(p)
    _add_operator_flags(p)
    p.set_defaults(func=cmd_migrate)

    order = sub.add_parser("order", help="signed migration orders").add_subparsers(dest="order_command", required=True)
    p = order.add_parser("create", help="sign an order: VM, source, destination, expiry")
    p.add_argument("vm")
    p.add_argument("--from", dest="source", required=True, help="source host")
    p.add_argument("--to", required=True, help="destination host")
    p.add_argument("--ttl", default="5m", help="how long the order is valid, e.g. 90s, 5m, 2h (default 5m)")
    p.add_argument("--out", help="write the order here (default: print it)")
    p.add_argument("--json", action="store_true", help="print the order's fields as JSON")
    _add_operator_flags(p)
    p.set_defaults(func=cmd_order_create)
    p = order.add_parser("show", help="show an order's fields (without verifying it)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_order_show)

    p = sub.add_parser("place", help="choose a destination for a VM from signed resource adverts")
    p.add_argument("vm")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_place)

    psk = sub.add_parser("psk", help="the optional dynamic pre-shared key per pair of hosts").add_subparsers(
        dest="psk_command", required=True
    )
    p = psk.add_parser("provision", help="set the PSK shared with a peer (generates one if --key is omitted)")
    p.add_argument("peer")
    p.add_argument("--key", help="64 hex digits; omit to generate")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_psk_provision)
    p = psk.add_parser("status", help="epoch and fingerprint per peer (never the key)")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_psk_status)

    audit = sub.add_parser("audit", help="the agent's signed, hash-chained audit log").add_subparsers(
        dest="audit_command", required=True
    )
    p = audit.add_parser("show", help="recent audit entries")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--kind", help="only entries of this kind, e.g. order.refused")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_audit_show)
    p = audit.add_parser("verify", help="check the chain and every signature; names any tampered entry")
    p.add_argument("--file", help="verify an exported log (JSONL) offline instead of asking the agent")
    p.add_argument("--certificate", help="with --file: the host certificate whose key signed the log")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("migrations", help="recent migrations on an agent")
    p.add_argument("--limit", type=int, default=20)
    _add_agent_flags(p)
    p.set_defaults(func=cmd_migrations)

    p = sub.add_parser("status", help="agent status")
    _add_agent_flags(p)
    p.set_defaults(func=cmd_status)

    from sealift.cli.monitor_cmd import add_monitor_parser

    add_monitor_parser(sub, _add_agent_flags, _client)

    p = sub.add_parser("image", help="the QEMU test guest image").add_subparsers(dest="image_command", required=True)
    p = p.add_parser("build", help="build (or find in the cache) the QEMU guest image")
    from sealift.backends.qemu.image import add_build_arguments, cli_build

    add_build_arguments(p)
    p.set_defaults(func=cli_build)

    p = sub.add_parser("demo", help="migrate a running VM (built-in or QEMU) between two local agents, securely")
    p.add_argument("--backend", default="builtin", choices=["builtin", "qemu"])
    p.add_argument("--memory", default="256M")
    p.add_argument("--workload", default="db", choices=["idle", "web", "db", "stress"])
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true")
    add_migration_flags(p)
    p.set_defaults(func=cmd_demo)

    from sealift.cli.lab_cmd import add_lab_parser

    add_lab_parser(sub)

    from sealift.cli.bench_cmd import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ConfigError, AgentUnavailable, AgentRequestFailed, SecurityError, OSError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
