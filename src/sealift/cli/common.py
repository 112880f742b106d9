"""What several `sealift` command groups share: finding the agent, common flags, JSON output, error codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sealift.agent.client import AgentClient, AgentRequestFailed, AgentUnavailable
from sealift.cli.render import console, out
from sealift.errors import SealiftError
from sealift.host.config import ConfigError, load_config, parse_size

DEFAULT_CONFIG = Path("/etc/sealift/agent.toml")

# The codes of errors the CLI reports that do not derive from SealiftError yet
# (agent/ is being restructured in parallel); the first match wins.
FALLBACK_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (AgentUnavailable, "agent_unavailable"),
    (AgentRequestFailed, "agent_request_failed"),
    (ConfigError, "config_error"),
    (OSError, "os_error"),
    (ValueError, "invalid_argument"),  # a flag's value that does not parse (bench, lab)
)


class CliError(SealiftError):
    """Something the operator can fix; printed without a traceback."""

    code = "cli_error"


def error_code(exc: BaseException) -> str:
    """The machine-readable reason of a failure: its own code, else the fallback for its kind."""
    code = getattr(exc, "code", None)  # SealiftError's (AgentRequestFailed carries the agent's)
    if isinstance(code, str) and code:
        return code
    for kind, fallback in FALLBACK_CODES:
        if isinstance(exc, kind):
            return fallback
    return SealiftError.code


def failure_json(exc: BaseException) -> dict[str, str]:
    """What --json prints when a command fails."""
    return {"status": "failed", "error": str(exc), "code": error_code(exc)}


def print_failure_json(args: argparse.Namespace, exc: BaseException) -> None:
    """With --json, the failure as one JSON object on stdout (the message goes to stderr as without it)."""
    if getattr(args, "json", False):
        print_json(failure_json(exc))


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def report(args: argparse.Namespace, result: object, message: str) -> int:
    """Print `result` as JSON with --json, else the one-line `message`; returns the exit status."""
    if args.json:
        print_json(result)
    else:
        out.print(message)
    return 0


def show_fields(args: argparse.Namespace, fields: dict[str, object]) -> int:
    """Print `fields` as JSON with --json, else one `key: value` line each; returns the exit status."""
    if args.json:
        print_json(fields)
    else:
        for key, value in fields.items():
            out.print(f"[bold]{key}[/bold]: {value}")
    return 0


def socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    if os.environ.get("SEALIFT_SOCKET"):
        return Path(os.environ["SEALIFT_SOCKET"])
    config_path = Path(args.config) if getattr(args, "config", None) else DEFAULT_CONFIG
    if not config_path.exists():
        raise CliError(f"no agent config at {config_path}: pass --config FILE or --socket PATH (or set SEALIFT_SOCKET)")
    return load_config(config_path).control_socket


def client(args: argparse.Namespace) -> AgentClient:
    return AgentClient(socket_path(args))


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"agent config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--socket", help="agent control socket (overrides --config)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def agent_command(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """Finish a subcommand that asks the agent: the agent flags (after its own arguments), and its function."""
    add_agent_flags(parser)
    parser.set_defaults(func=func)


def add_operator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--operator", help="operator name (default $SEALIFT_OPERATOR)")
    parser.add_argument(
        "--operator-dir",
        help="directory with NAME.key/NAME.pem (default $SEALIFT_OPERATOR_DIR or /etc/sealift/operator)",
    )


def operator(args: argparse.Namespace):  # -> OperatorIdentity
    from sealift.security.operators import OperatorIdentity

    name = args.operator or os.environ.get("SEALIFT_OPERATOR")
    directory = Path(args.operator_dir or os.environ.get("SEALIFT_OPERATOR_DIR", "/etc/sealift/operator"))
    if not name:
        raise CliError("which operator signs? pass --operator NAME (and --operator-dir) or set SEALIFT_OPERATOR")
    return OperatorIdentity.load(directory, name)


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


# -- migration options: `sealift migrate` and `sealift demo` ---------------------


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
    if args.postcopy is not None:
        options["postcopy"] = args.postcopy
    if args.postcopy_after is not None:
        options["postcopy_after_s"] = args.postcopy_after
    if args.completion_action is not None:
        options["completion_action"] = args.completion_action
    return options


def add_migration_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--downtime-ms", type=int, help="downtime budget for stop-and-copy (default 300)")
    parser.add_argument("--bandwidth", help="bandwidth limit per second, e.g. 200M (default unlimited)")
    parser.add_argument("--max-rounds", type=int, help="maximum pre-copy rounds (default 30)")
    parser.add_argument("--compression", choices=["zstd", "lz4", "none"], help="compress page data (default none)")
    parser.add_argument(
        "--auto-converge", action="store_true", help="throttle a guest that dirties faster than the link"
    )
    parser.add_argument(
        "--completion-timeout",
        type=float,
        metavar="SECONDS",
        help="QEMU guests: cancel a pre-copy not at its switchover after this long; the guest "
        "keeps running on the source (default: no limit, as in QEMU)",
    )
    parser.add_argument("--no-zero-elision", action="store_true", help="send zero pages too")
    parser.add_argument(
        "--image-digest",
        choices=["tags", "blake3"],
        help="end-to-end image check (default tags: AES-GCM tags and a page map; blake3 hashes every page, slower)",
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext baseline: NO encryption or authentication")
    qemu = parser.add_argument_group("QEMU guests")
    qemu.add_argument(
        "--transport",
        choices=["sealift", "qemu-tls", "ipsec", "plain", "sealift-plain"],
        help="how QEMU's stream travels: sealift (the agents' channel, default), qemu-tls (QEMU's native TLS "
        "with the hosts' cluster certificates), ipsec (QEMU's TCP inside a per-migration strongSwan IPsec SA), "
        "plain or sealift-plain (in clear: need --insecure)",
    )
    qemu.add_argument(
        "--multifd-channels",
        type=int,
        default=0,
        metavar="N",
        help="QEMU multifd with N parallel connections (every transport; at most 16 through the agents)",
    )
    qemu.add_argument("--xbzrle", action="store_true", help="QEMU's XBZRLE delta compression of re-sent pages")
    qemu.add_argument("--xbzrle-cache", metavar="SIZE", help="XBZRLE cache size, e.g. 256M (default QEMU's 64M)")
    qemu.add_argument(
        "--postcopy",
        nargs="?",
        const="after-precopy",
        choices=["off", "after-timeout", "after-precopy", "on-stall"],
        help="switch to post-copy (the guest runs on the destination while its pages follow; sealift "
        "transport): after-precopy (the default with --postcopy: after the first pass), after-timeout "
        "(--postcopy-after SECONDS), on-stall (dirty rate at or above the link's for 3 passes)",
    )
    qemu.add_argument(
        "--postcopy-after", type=float, metavar="SECONDS", help="with --postcopy after-timeout (default 10)"
    )
    qemu.add_argument(
        "--completion-action",
        choices=["abort", "postcopy"],
        help="what --completion-timeout does: abort the pre-copy (default; the guest stays) or switch to "
        "post-copy (as KubeVirt's allowPostCopy)",
    )


def warn_insecure() -> None:
    console.print(
        "[bold red]WARNING: --insecure sends the VM's memory in clear, without authentication. "
        "Use it only to measure the baseline or in the lab.[/bold red]"
    )
