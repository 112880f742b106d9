"""Rich output for people; the same data goes out as JSON with --json."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)  # stdout stays clean for --json
out = Console()

# Log lines where no one watches a terminal (a file, a pipe, journald): one plain line each.
PLAIN_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The CLI's own lines (a migration's rounds) are for the operator: shown at INFO.
progress_log = logging.getLogger("sealift.cli.progress")

_handler: logging.Handler | None = None  # the one this module installed on the root logger


def log_handler(terminal: bool) -> logging.Handler:
    """Rich on a terminal; elsewhere plain `time level logger: message`, without rich's source locations."""
    if terminal:
        return RichHandler(console=console, show_path=False, markup=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PLAIN_LOG_FORMAT))
    return handler


def setup_logging(level: str | int | None = None) -> None:
    """Send log records to stderr, rich or plain by whether stderr is a terminal.

    Replaces only the handler it installed before (others, e.g. pytest's, stay);
    `level` sets the root logger's level, None leaves it as it is.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = log_handler(sys.stderr.isatty())
    root.addHandler(_handler)
    if level is not None:
        root.setLevel(level)
    progress_log.setLevel(logging.INFO)


class MigrationProgress:
    """A live bar per migration: round, pages, MiB/s, dirty pages left, ETA."""

    def __init__(self, vm: str, destination: str, enabled: bool = True) -> None:
        self._enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>8.0f}/{task.total:<8.0f} pages"),
            TextColumn("{task.fields[rate]:>8} MiB/s"),
            TextColumn("dirty {task.fields[dirty]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self._title = f"{vm} → {destination}"
        self._task: TaskID | None = None
        self._last_bytes = 0
        self._last_time = time.monotonic()
        self._rate = 0.0
        self._dirty = "-"

    def __enter__(self) -> MigrationProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task(self._title, total=1, rate="-", dirty="-", eta="-")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def on_event(self, event: dict) -> None:
        task = self._task
        if task is None:
            return
        kind = event.get("event")
        if kind == "transfer":
            self._transfer(task, event)
        elif kind == "round":
            self._dirty = str(event.get("dirty_pages_left", "-"))
            label = "stop-and-copy" if event.get("final") else f"round {event['round']}"
            sent = max(1, int(event["pages_sent"]))
            self._progress.update(task, description=f"{self._title} {label}", completed=sent, total=sent, eta="0s")
            progress_log.info(
                f"{label}: {event['pages_sent']} pages, {event['bytes_sent'] / 2**20:.1f} MiB in "
                f"{event['duration_s'] * 1000:.0f} ms ({event['throughput_mib_s']} MiB/s), "
                f"{event['dirty_pages_left']} dirty left → {event['decision']} ({event['reason']})"
            )
        elif kind == "phase":
            self._progress.update(task, description=f"{self._title} [{event['phase']}]")
        elif kind == "disk":  # the disk mirror, before the memory: shown on the same bar, labelled
            done, total = int(event["bytes_done"]), max(1, int(event["bytes_total"]))
            label = f"disks {event['ready']}/{event['disks']} ready"
            self._progress.update(task, description=f"{self._title} {label}", completed=done, total=total)

    def _transfer(self, task: TaskID, event: dict) -> None:
        now = time.monotonic()
        wire = int(event["wire_bytes"])
        if now > self._last_time:
            instant = (wire - self._last_bytes) / (now - self._last_time)
            self._rate = instant if self._rate == 0 else 0.7 * self._rate + 0.3 * instant
        self._last_bytes, self._last_time = wire, now
        done, total = int(event["pages_done"]), max(1, int(event["pages_total"]))
        remaining = max(0, total - done) * 4096
        eta = f"{remaining / self._rate:.1f}s" if self._rate > 0 else "-"
        self._progress.update(
            task,
            description=f"{self._title} round {event['round']}",
            completed=done,
            total=total,
            rate=f"{self._rate / 2**20:.0f}",
            dirty=self._dirty,
            eta=eta,
        )


def report_table(report: dict) -> Table:
    table = Table(title=f"migration {report.get('migration_id', '')[:12]}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    status = report.get("status", "?")
    color = "green" if status == "completed" else "red"
    rows = [
        ("status", f"[{color}]{status}[/{color}]"),
        ("vm", f"{report.get('vm')}  {report.get('source')} → {report.get('destination')}"),
        ("transport", str(report.get("transport"))),
        ("memory", f"{int(report.get('memory_bytes', 0)) >> 20} MiB"),
        ("total time", f"{report.get('total_time_s', 0):.3f} s"),
        ("downtime", f"{report.get('downtime_ms', 0):.1f} ms"),
        ("rounds", f"{report.get('rounds')} ({report.get('stop_reason') or '-'})"),
        ("pages sent", str(report.get("pages_sent"))),
        ("bytes sent", f"{int(report.get('bytes_sent', 0)) / 2**20:.1f} MiB"),
        (
            "CPU seconds",
            f"source {report.get('source_cpu_s', 0):.2f} s, destination {report.get('destination_cpu_s', 0):.2f} s",
        ),
        (
            "counter",
            f"{report.get('counter_before')} at start, {report.get('counter_at_pause')} at pause, "
            f"{report.get('counter_after')} after resume",
        ),
        ("image digest", str(report.get("image_digest") or "-")),
    ]
    if report.get("disks"):  # QEMU VMs with disks: the storage side beside the memory figures above
        mirror = report.get("mirror_time_s")
        rows.append(
            (
                "disks",
                f"{report['disks']} ({report.get('disks_copied', 0)} copied, the others shared); "
                f"{int(report.get('disk_bytes_sent', 0)) / 2**20:.1f} MiB sent, mirror "
                + (f"ready in {mirror:.3f} s" if mirror is not None else "-"),
            )
        )
    if report.get("error"):
        rows.append(("error", f"[red]{report['error']}[/red]"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def vm_table(vms: list[dict]) -> Table:
    table = Table(title="VMs")
    for col in ("name", "pid", "memory", "profile", "counter", "state", "nic", "disks", "boot"):
        table.add_column(col)
    for vm in vms:
        state = (
            "migrating"
            if vm.get("migrating")
            else ("paused" if vm.get("paused") else ("running" if vm.get("alive") else "dead"))
        )
        table.add_row(
            str(vm.get("name")),
            str(vm.get("pid")),
            f"{int(vm.get('memory_bytes', 0)) >> 20} MiB",
            str(vm.get("profile")),
            str(vm.get("counter")),
            state,
            _nic(vm.get("net")),
            "\n".join(f"{d['path']} ({d['format']}{', shared' if d['shared'] else ''})" for d in vm.get("disks") or []),
            _boot(vm.get("boot")),
        )
    return table


def _boot(boot: object) -> str:
    """How a QEMU VM boots: "disk (firmware PATH)", "kernel PATH", or nothing for sealift's image."""
    if not isinstance(boot, dict):
        return ""
    if boot.get("from") == "disk":
        return f"disk (firmware {boot.get('firmware')})"
    if boot.get("from") == "kernel":
        return f"kernel {boot.get('kernel')}"
    return ""


def _nic(net: object) -> str:
    if not isinstance(net, dict):
        return ""
    return f"tap {net.get('tap')} {net.get('guest_ip')}" if net.get("mode") == "tap" else str(net.get("mode"))
