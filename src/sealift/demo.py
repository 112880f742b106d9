"""`sealift demo`: a running VM moves securely from one host to another.

In a temporary directory: a cluster CA, two host certificates, two agents as
separate processes on localhost, a built-in VM with a writing workload on
host-a, a live migration to host-b with a progress bar, then proof that the
guest continues on host-b where it stopped (its counter) with its memory
intact (its own check), and the report.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealift.agent.client import AgentClient, AgentRequestFailed, AgentUnavailable
from sealift.backends.qemu.vm import probe_udp
from sealift.cli.common import failure_json
from sealift.cli.render import MigrationProgress, console, out, report_table
from sealift.cluster import LocalCluster
from sealift.host.config import parse_size
from sealift.security.orders import describe_order

if TYPE_CHECKING:
    from sealift.lab.debian_migration import DebianMigration
    from sealift.lab.libvirt_debian import LibvirtDebianLab, LibvirtDebianMigration

SOURCE, DESTINATION, VM = "host-a", "host-b", "demo-vm"


@dataclass(frozen=True)
class DemoOptions:
    memory: str = "256M"
    workload: str = "db"
    insecure: bool = False
    show_progress: bool = True
    keep: bool = False
    warmup_s: float = 1.0
    migration: dict[str, object] = field(default_factory=dict)
    backend: str = "builtin"  # or "qemu": a real QEMU guest (TCG or KVM), the test image; or "libvirt"
    # "sealift" (the test guest) or "debian", the Debian guest on the lab's network (qemu:
    # lab/debian_migration.py; libvirt: lab/libvirt_debian.py)
    guest: str = "sealift"


def run_demo(options: DemoOptions) -> dict[str, object]:
    say = console.print if options.show_progress else (lambda *a, **k: None)
    started = time.monotonic()
    if options.backend == "libvirt" and options.guest == "debian":
        return _run_libvirt_debian(options, say, started)
    if options.backend == "libvirt":
        return _run_libvirt(options, say, started)
    if options.guest == "debian":
        return _run_debian(options, say, started)
    cluster = LocalCluster(allow_insecure=options.insecure)
    try:
        say(f"[bold]sealift demo[/bold] in {cluster.root}")
        say(f"  cluster CA, host certificates for {SOURCE}, {DESTINATION} and an operator certificate (ECDSA P-256)")
        cluster.start()
        say(
            f"  agents up: {SOURCE} on {cluster.agents[SOURCE].listen}, "
            f"{DESTINATION} on {cluster.agents[DESTINATION].listen}"
        )
        src, dst = cluster.client(SOURCE), cluster.client(DESTINATION)
        if options.backend == "qemu":
            return _run_qemu(cluster, options, say, started)
        vm = src.request("vm.start", name=VM, memory=options.memory, workload=options.workload)["vm"]
        say(f"  started {VM} on {SOURCE}: {options.memory} RAM, workload {options.workload}, pid {vm['pid']}")
        time.sleep(options.warmup_s)  # let the workload dirty memory first
        try:
            report = _migrate(cluster, src, options, say)
        except AgentRequestFailed as exc:
            return _failed(exc)
        time.sleep(0.3)  # let the guest tick on its new host
        after = dst.request("vm.info", name=VM)["vm"]
        check = dst.request("vm.check", name=VM)["check"]
        result = _result(
            cluster,
            report,
            started,
            src,
            after,
            backend="builtin",
            counter_after=after["counter"],
            memory_check={"bad_pages": check["bad_page_count"], "secret_intact": check["secret_intact"]},
            probe_answer=None,  # the built-in VM has no network service
            running_there=bool(after["alive"]),
        )
        _show_outcome(
            options,
            report,
            f"[bold green]{VM} now runs on {DESTINATION}[/bold green] (pid {after['pid']}): counter was "
            f"{report['counter_at_pause']} when paused on {SOURCE}, resumed at {report['counter_after']}, "
            f"now {after['counter']}; memory check: {check['bad_page_count']} bad pages, secret "
            f"{'intact' if check['secret_intact'] else 'ALTERED'}; copies on {SOURCE}: "
            f"{'1 (!)' if result['copies_running']['source'] else '0'}",
        )
        return result
    finally:
        if options.keep:
            cluster.stop()
            say(f"  kept {cluster.root}")
        else:
            cluster.cleanup()


def order_id(envelope: str) -> str:
    return str(describe_order(envelope).get("order_id", "?"))[:12]


def _migrate(
    cluster: LocalCluster, src: AgentClient, options: DemoOptions, say: Callable[..., object]
) -> dict[str, Any]:
    """Sign an order for VM from SOURCE to DESTINATION and migrate it under a progress bar; the agent's report.

    An AgentRequestFailed is shown while the progress bar is still up, then raised on.
    """
    migration = {"secure": not options.insecure, **options.migration}
    order = cluster.order(VM, SOURCE, DESTINATION)
    say(
        f"  operator {cluster.operator.name} (admin) signed migration order {order_id(order)}: "
        f"{VM} {SOURCE} → {DESTINATION}"
    )
    with MigrationProgress(VM, DESTINATION, enabled=options.show_progress) as progress:
        try:
            report: dict[str, Any] = src.request(
                "migrate", on_event=progress.on_event, vm=VM, to=DESTINATION, options=migration, order=order
            )["report"]
        except AgentRequestFailed as exc:
            if options.show_progress:
                console.print(f"[bold red]migration failed:[/bold red] {exc}")
            raise
    return report


def _audit_ok(cluster: LocalCluster) -> dict[str, bool]:
    """Each host's verdict on its own audit log."""
    return {host: cluster.client(host).request("audit.verify")["verification"]["ok"] for host in (SOURCE, DESTINATION)}


def _show_outcome(options: DemoOptions, report: dict[str, Any], conclusion: str) -> None:
    """The report table and a line on where the guest runs now (not with --json)."""
    if options.show_progress:
        out.print(report_table(report))
        out.print(conclusion)


def _failed(exc: AgentRequestFailed) -> dict[str, object]:
    """The migration was refused or failed: what every failing command prints with --json."""
    failure: dict[str, object] = {**failure_json(exc)}
    return failure


def _result(
    cluster: LocalCluster,
    report: dict[str, Any],
    started: float,
    src: AgentClient,
    after: dict[str, Any],
    *,
    backend: str,
    counter_after: int | None,
    memory_check: dict[str, object] | None,
    probe_answer: int | None,
    running_there: bool,
    vm: str = VM,
) -> dict[str, Any]:
    """What `sealift demo --json` prints: the same keys for every backend, None where one does not know.

    docs/schemas/demo.schema.json describes it; the keys named as in the migration report mean the same.
    `after` is the destination's vm.info of the migrated guest; the source is asked whether a copy is left.
    """
    source_vms = [v["name"] for v in src.request("vm.list")["vms"]]
    disk_bytes = report.get("disk_bytes_sent")
    return {
        "status": report["status"],
        "backend": backend,
        "transport": report["transport"],
        "total_time_s": report["total_time_s"],
        "downtime_ms": report["downtime_ms"],
        "rounds": report["rounds"],
        "bytes_sent": report["bytes_sent"],
        "pages_sent": report["pages_sent"],
        "memory_bytes": report["memory_bytes"],
        "counter_before": report["counter_before"],
        "counter_at_pause": report["counter_at_pause"],
        "counter_at_resume": report["counter_after"],  # the report's counter_after: right after the resume
        "counter_after": counter_after,  # a moment later, on the destination
        "destination_pid": after["pid"],
        "memory_check": memory_check,
        "probe_answer": probe_answer,
        "copies_running": {"source": vm in source_vms, "destination": running_there},
        "source_cpu_s": report["source_cpu_s"],
        "destination_cpu_s": report["destination_cpu_s"],
        "image_digest": report["image_digest"],
        "stop_reason": report["stop_reason"],
        "order_id": report["order_id"],
        "audit_ok": _audit_ok(cluster),
        "downtime_breakdown_ms": report["downtime_breakdown_ms"],
        "round_reports": report["round_reports"],
        "demo_time_s": round(time.monotonic() - started, 2),
        **_postcopy_result(report),
        # The Debian guest's figures (null for the others): the report's sealed disk bytes, and the client's.
        "disk_bytes_sent": disk_bytes if report.get("disks_copied") else None,
        "client_outage_ms": None,
        "requests_failed": None,
        "writes_lost": None,
        "disk_check": None,
    }


def _postcopy_result(report: dict[str, Any]) -> dict[str, object]:
    """QEMU post-copy's figures for --json: whether it switched, how long the pages took, how many were asked for."""
    postcopy = report.get("postcopy")
    if not postcopy:
        return {"postcopy": False, "postcopy_time_s": None, "page_requests": None}
    return {
        "postcopy": True,
        "postcopy_time_s": postcopy.get("postcopy_s"),
        "page_requests": postcopy.get("postcopy_requests"),
    }


QEMU_BOOT_TIMEOUT_S = 90.0


def _run_qemu(
    cluster: LocalCluster, options: DemoOptions, say: Callable[..., object], started: float
) -> dict[str, object]:
    """The same demo with a real QEMU guest: its console counter and UDP probe are the proof."""
    src, dst = cluster.client(SOURCE), cluster.client(DESTINATION)
    try:
        vm = src.request("vm.start", name=VM, backend="qemu", memory=options.memory)["vm"]
        say(f"  started QEMU guest {VM} on {SOURCE}: {options.memory} RAM, {vm['accel']}, pid {vm['pid']}; booting...")
        before = _wait_counter(src, 0, QEMU_BOOT_TIMEOUT_S)
        say(f"  {VM} runs: console counter {before}")
        if options.workload == "stress":  # the guest's write storm: it dirties memory as fast as it can
            src.request("vm.workload", name=VM, profile="stress")
            say(f"  {VM}: write storm on (workload stress)")
        time.sleep(options.warmup_s)
        try:
            report = _migrate(cluster, src, options, say)
        except AgentRequestFailed as exc:
            return _failed(exc)
        paused = int(report["counter_at_pause"] or 0)
        now = _wait_counter(dst, paused, 30)
        after = dst.request("vm.info", name=VM)["vm"]
        probe = probe_udp((after["probe"][0], int(after["probe"][1])), 2.0) if after.get("probe") else None
        result = _result(
            cluster,
            report,
            started,
            src,
            after,
            backend="qemu",
            counter_after=now,
            memory_check=None,  # no check from inside a QEMU guest: its counter and probe answer are the proof
            probe_answer=probe,
            running_there=after["status"] == "running",
        )
        _show_outcome(
            options,
            report,
            f"[bold green]{VM} now runs on {DESTINATION}[/bold green] (QEMU pid {after['pid']}): counter was "
            f"{paused} when paused on {SOURCE}, now {now}; UDP probe answered {probe}; copies on {SOURCE}: "
            f"{'1 (!)' if result['copies_running']['source'] else '0'}",
        )
        return result
    finally:
        for client in (src, dst):  # QEMU outlives its agent by design: stop the guests first
            try:
                for info in client.request("vm.list")["vms"]:
                    client.request("vm.stop", name=info["name"])
            except (AgentRequestFailed, AgentUnavailable):
                pass


def _wait_counter(client: AgentClient, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counter = client.request("vm.info", name=VM)["vm"].get("counter")
        if counter is not None and counter > above:
            return int(counter)
        time.sleep(0.2)
    raise TimeoutError(f"{VM}: the console counter did not pass {above} within {timeout:.0f} s")


def _run_libvirt(options: DemoOptions, say: Callable[..., object], started: float) -> dict[str, object]:
    """The demo with libvirt: two libvirtds (each in its own mount namespace), the test guest as a domain.

    libvirt migrates it (live, its qcow2 disk copied by NBD); the agents
    decide and carry every one of libvirt's connections.
    """
    from sealift.backends.libvirt.lab import LibvirtLabHost, define_test_domain

    root = Path(tempfile.mkdtemp(prefix="slv-demo-", dir="/tmp"))  # short: unix socket paths are limited
    hosts = {name: LibvirtLabHost(name, root / name[-1]) for name in (SOURCE, DESTINATION)}
    cluster: LocalCluster | None = None
    try:
        for host in hosts.values():
            host.start()
        say(f"[bold]sealift demo[/bold] (libvirt): libvirtd for {SOURCE} and {DESTINATION}, each in its own namespaces")
        settings = {
            name: "[libvirt]\n" + "".join(f'{key} = "{value}"\n' for key, value in host.agent_settings().items())
            for name, host in hosts.items()
        }
        cluster = LocalCluster(allow_insecure=options.insecure, host_config=settings)
        cluster.start()
        src, dst = cluster.client(SOURCE), cluster.client(DESTINATION)
        memory_mib = max(64, parse_size(options.memory) >> 20)
        define_test_domain(hosts[SOURCE], VM, memory_mib=memory_mib)
        say(f"  defined and started libvirt domain {VM} on {SOURCE}: {memory_mib} MiB, a 32 MiB qcow2 disk; booting...")
        before = _wait_counter(src, 0, QEMU_BOOT_TIMEOUT_S)
        say(f"  {VM} runs: console counter {before}")
        time.sleep(options.warmup_s)
        try:
            report = _migrate(cluster, src, options, say)
        except AgentRequestFailed as exc:
            return _failed(exc)
        paused = int(report["counter_at_pause"] or 0)
        now = _wait_counter(dst, paused, 30)
        after = dst.request("vm.info", name=VM)["vm"]
        result = _result(
            cluster,
            report,
            started,
            src,
            after,
            backend="libvirt",
            counter_after=now,
            memory_check=None,  # its console counter is the proof that it goes on
            probe_answer=None,  # the domain has no network here
            running_there=after["status"] == "running",
        )
        _show_outcome(
            options,
            report,
            f"[bold green]{VM} now runs on {DESTINATION}[/bold green] (libvirt domain, QEMU pid {after['pid']}): "
            f"counter was {paused} when paused on {SOURCE}, now {now}; copies on {SOURCE}: "
            f"{'1 (!)' if result['copies_running']['source'] else '0'}",
        )
        return result
    finally:
        if cluster is not None:
            cluster.cleanup()
        for host in hosts.values():
            host.stop()
        shutil.rmtree(root, ignore_errors=True)


def _run_debian(options: DemoOptions, say: Callable[..., object], started: float) -> dict[str, object]:
    """The Debian guest with its own disk serving a client on the lab's network, migrated under it."""
    from sealift.lab.debian_migration import DESTINATION as DEBIAN_DESTINATION
    from sealift.lab.debian_migration import VM as DEBIAN_VM
    from sealift.lab.debian_migration import run_debian_migration

    def summarize(cluster: LocalCluster, report: dict[str, Any]) -> dict[str, Any]:
        return _debian_common(cluster, report, started, "qemu", None)

    say("[bold]sealift demo[/bold]: the Debian guest (nginx, redis) with its own disk, on the lab's network")
    try:
        run = run_debian_migration(
            say, migration=dict(options.migration), memory_mib=parse_size(options.memory) >> 20, on_migrated=summarize
        )
    except AgentRequestFailed as exc:
        return _failed(exc)
    result = {**run.extra, **_debian_figures(run), "demo_time_s": round(time.monotonic() - started, 2)}
    _show_debian_outcome(options, run, DEBIAN_VM, DEBIAN_DESTINATION)
    return result


def _debian_common(
    cluster: LocalCluster, report: dict[str, Any], started: float, backend: str, running_there: bool | None
) -> dict[str, Any]:
    """The keys of every demo for the Debian guest (`running_there`: None to ask the destination agent)."""
    from sealift.lab.debian_migration import DESTINATION as DEBIAN_DESTINATION
    from sealift.lab.debian_migration import VM as DEBIAN_VM

    after = cluster.client(DEBIAN_DESTINATION).request("vm.info", name=DEBIAN_VM)["vm"]
    return _result(
        cluster,
        report,
        started,
        cluster.client(SOURCE),
        after,
        backend=backend,
        counter_after=None,  # the Debian guest has no counter: the client's answers are the proof
        memory_check=None,
        probe_answer=None,
        running_there=after["status"] == "running" if running_there is None else running_there,
        vm=DEBIAN_VM,
    )


def _debian_figures(run: DebianMigration) -> dict[str, Any]:
    """The Debian guest's keys of --json: what its client saw, and the disk check."""
    outage, disk = run.outage, run.disk
    return {
        "client_outage_ms": outage.longest_gap_ms,
        "requests_failed": outage.http_failed + outage.redis_failed,
        "writes_lost": outage.writes_lost,
        "disk_check": {
            "ok": disk.ok,
            "writes_on_source_disk": disk.writes_on_source_disk,
            "writes_on_destination_disk": disk.writes_on_destination_disk,
            "source_writes_missing_at_destination": disk.source_writes_missing_at_destination,
            "acked_writes_missing_on_disk": disk.acked_writes_missing_on_disk,
            "secret_on_disk": disk.secret_on_disk,
        },
    }


def _show_debian_outcome(options: DemoOptions, run: DebianMigration, vm: str, destination: str) -> None:
    outage, disk = run.outage, run.disk
    good = outage.writes_lost == 0 and disk.ok and run.serving_at_destination and run.secret_intact
    color = "green" if good else "red"
    _show_outcome(
        options,
        run.report,
        f"[bold {color}]{vm} now serves from {destination}[/bold {color}]: the client saw "
        f"{outage.longest_gap_ms} ms without an answer, {outage.http_failed + outage.redis_failed} failed requests, "
        f"{outage.writes_lost} of {outage.writes_acked} acknowledged writes lost; disk copied "
        f"({run.report.get('disk_bytes_sent')} sealed bytes): {disk.writes_on_source_disk} writes on the source's "
        f"image at the pause, {disk.source_writes_missing_at_destination} of them and "
        f"{disk.acked_writes_missing_on_disk} acknowledged writes missing from the destination's; "
        f"secret {'intact' if run.secret_intact and disk.secret_on_disk else 'MISSING'}",
    )


def libvirt_debian_result(env: LibvirtDebianLab, result: LibvirtDebianMigration, started: float) -> dict[str, Any]:
    """--json of `demo --backend libvirt --guest debian` (the agents still running): the keys of every demo,
    the Debian guest's figures, and libvirt's own view of where the domain is (`virsh domstate`)."""
    from sealift.lab.debian_migration import DESTINATION as DEBIAN_DESTINATION

    running = result.domstate.get(DEBIAN_DESTINATION) == "running"
    common = _debian_common(env.cluster, result.run.report, started, "libvirt", running)
    return {**common, **_debian_figures(result.run), "demo_time_s": round(time.monotonic() - started, 2)}


def _run_libvirt_debian(options: DemoOptions, say: Callable[..., object], started: float) -> dict[str, object]:
    """The Debian guest as a libvirt domain of one of two libvirtds, serving a client, migrated through sealift."""
    from sealift.lab.debian_migration import DESTINATION as DEBIAN_DESTINATION
    from sealift.lab.debian_migration import VM as DEBIAN_VM
    from sealift.lab.libvirt_debian import run_libvirt_debian_migration

    say("[bold]sealift demo[/bold] (libvirt): the Debian guest (nginx, redis) as a domain, on the lab's network")
    try:
        result = run_libvirt_debian_migration(
            say,
            memory_mib=parse_size(options.memory) >> 20,
            migration=dict(options.migration),
            on_migrated=lambda env, res: libvirt_debian_result(env, res, started),
        )
    except AgentRequestFailed as exc:
        return _failed(exc)
    _show_debian_outcome(options, result.run, DEBIAN_VM, DEBIAN_DESTINATION)
    say(f"  virsh domstate {DEBIAN_VM}: " + ", ".join(f"{h} {s or 'not defined'}" for h, s in result.domstate.items()))
    return {**result.run.extra, "demo_time_s": round(time.monotonic() - started, 2)}
