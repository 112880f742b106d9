"""`sealift demo`: a running VM moves securely from one host to another.

In a temporary directory: a cluster CA, two host certificates, two agents as
separate processes on localhost, a built-in VM with a writing workload on
host-a, a live migration to host-b with a progress bar, then proof that the
guest continues on host-b where it stopped (its counter) with its memory
intact (its own check), and the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sealift.agent.client import AgentRequestFailed
from sealift.cli.render import MigrationProgress, console, out, report_table
from sealift.cluster import LocalCluster
from sealift.security.orders import describe_order

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


def run_demo(options: DemoOptions) -> dict[str, object]:
    say = console.print if options.show_progress else (lambda *a, **k: None)
    started = time.monotonic()
    cluster = LocalCluster(allow_insecure=options.insecure)
    try:
        say(f"[bold]sealift demo[/bold] in {cluster.root}")
        say(f"  cluster CA, host certificates for {SOURCE}, {DESTINATION} and an operator certificate (ECDSA P-256)")
        cluster.start()
        say(f"  agents up: {SOURCE} on {cluster.agents[SOURCE].listen}, {DESTINATION} on {cluster.agents[DESTINATION].listen}")
        src, dst = cluster.client(SOURCE), cluster.client(DESTINATION)
        vm = src.request("vm.start", name=VM, memory=options.memory, workload=options.workload)["vm"]
        say(f"  started {VM} on {SOURCE}: {options.memory} RAM, workload {options.workload}, pid {vm['pid']}")
        time.sleep(options.warmup_s)  # let the workload dirty memory first
        migration = {"secure": not options.insecure, **options.migration}
        order = cluster.order(VM, SOURCE, DESTINATION)
        say(f"  operator {cluster.operator.name} (admin) signed migration order {order_id(order)}: {VM} {SOURCE} → {DESTINATION}")
        with MigrationProgress(VM, DESTINATION, enabled=options.show_progress) as progress:
            try:
                report = src.request(
                    "migrate", on_event=progress.on_event, vm=VM, to=DESTINATION, options=migration, order=order
                )["report"]
            except AgentRequestFailed as exc:
                return _failed(str(exc), src, options)
        time.sleep(0.3)  # let the guest tick on its new host
        after = dst.request("vm.info", name=VM)["vm"]
        check = dst.request("vm.check", name=VM)["check"]
        source_vms = [v["name"] for v in src.request("vm.list")["vms"]]
        result = {
            "status": report["status"],
            "transport": report["transport"],
            "total_time_s": report["total_time_s"],
            "downtime_ms": report["downtime_ms"],
            "rounds": report["rounds"],
            "bytes_sent": report["bytes_sent"],
            "pages_sent": report["pages_sent"],
            "memory_bytes": report["memory_bytes"],
            "counter_before": report["counter_before"],
            "counter_at_pause": report["counter_at_pause"],
            "counter_at_resume": report["counter_after"],
            "counter_after": after["counter"],
            "destination_pid": after["pid"],
            "memory_check": {"bad_pages": check["bad_page_count"], "secret_intact": check["secret_intact"]},
            "copies_running": {"source": VM in source_vms, "destination": bool(after.get("alive"))},
            "source_cpu_s": report["source_cpu_s"],
            "destination_cpu_s": report["destination_cpu_s"],
            "image_digest": report["image_digest"],
            "order_id": report.get("order_id"),
            "audit_ok": {host: cluster.client(host).request("audit.verify")["verification"]["ok"] for host in (SOURCE, DESTINATION)},
            "downtime_breakdown_ms": report["downtime_breakdown_ms"],
            "round_reports": report["round_reports"],
            "demo_time_s": round(time.monotonic() - started, 2),
        }
        if options.show_progress:
            out.print(report_table(report))
            out.print(
                f"[bold green]{VM} now runs on {DESTINATION}[/bold green] (pid {after['pid']}): counter was "
                f"{report['counter_at_pause']} when paused on {SOURCE}, resumed at {report['counter_after']}, "
                f"now {after['counter']}; memory check: {check['bad_page_count']} bad pages, secret "
                f"{'intact' if check['secret_intact'] else 'ALTERED'}; copies on {SOURCE}: "
                f"{'1 (!)' if VM in source_vms else '0'}"
            )
        return result
    finally:
        if options.keep:
            cluster.stop()
            say(f"  kept {cluster.root}")
        else:
            cluster.cleanup()


def order_id(envelope: str) -> str:
    return str(describe_order(envelope).get("id", "?"))[:12]


def _failed(error: str, src: object, options: DemoOptions) -> dict[str, object]:
    if options.show_progress:
        console.print(f"[bold red]migration failed:[/bold red] {error}")
    return {"status": "failed", "error": error, "transport": "plain" if options.insecure else "tls"}
