"""`sealift bench` arguments: the plan they make and the command the results record (no lab needed)."""

from __future__ import annotations

import pytest

from sealift.bench.harness import Cell
from sealift.cli.bench_cmd import QUICK_QEMU_MIB, build_plan, canonical_command
from sealift.cli.main import build_parser


def parse(*argv: str):  # -> argparse.Namespace
    return build_parser().parse_args(["bench", *argv])


def test_full_plan_covers_every_size_workload_backend_and_mtu() -> None:
    args = parse(
        "--sizes", "256M,1G", "--workloads", "idle,heavy", "--mtu", "1500,9000", "--runs", "5", "--backends", "qemu"
    )
    plan = build_plan(args)
    assert plan.repetitions == 5
    assert len(plan.cells) == 2 * 2 * 2
    assert Cell("qemu", 1024, "heavy", 9000) in plan.cells
    assert Cell("qemu", 256, "idle", 1500).guest_cmdline() == "sealift.mem_mib=153 sealift.rate_mib=0"
    assert Cell("qemu", 1024, "heavy", 1500).guest_cmdline() == "sealift.mem_mib=614 sealift.rate_mib=128"


def test_quick_plan_is_one_small_run_per_transport() -> None:
    plan = build_plan(parse("--quick"))
    assert plan.repetitions == 1
    assert [(c.backend, c.mtu) for c in plan.cells] == [("qemu", 1500), ("builtin", 1500)]
    assert plan.cells[0].memory_mib == QUICK_QEMU_MIB


def test_the_recorded_command_spells_out_every_choice() -> None:
    command = canonical_command(parse("--sizes", "1G", "--workloads", "moderate"))
    assert command.startswith("sealift bench --runs 3 --backends qemu,builtin --sizes 1G --workloads moderate ")
    assert "--mtu 1500" in command and "--timeout 300" in command
    # The recorded command parses back into the same plan.
    again = build_parser().parse_args(command.split()[1:])
    assert build_plan(again) == build_plan(parse("--sizes", "1G", "--workloads", "moderate"))


def test_ipsec_and_sealift_ipsec_are_refused_together_before_any_lab_is_built() -> None:
    from sealift.bench.harness import BenchError, Plan, available_transports, run_plan

    chosen, _ = available_transports(["ipsec", "sealift-ipsec"])
    if chosen != ["ipsec", "sealift-ipsec"]:
        pytest.skip("one of the IPsec transports is not available here")
    with pytest.raises(BenchError, match="cannot share a run"):
        run_plan(Plan([Cell("qemu", 160, "moderate", 1500)], ["plain", "ipsec", "sealift-ipsec"]))


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="sealift bench refuses to start without root")
def test_a_stopped_benchmark_keeps_the_runs_it_finished(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A full benchmark takes hours: results.json and results.md are rewritten after every run, so an
    interrupted one (Ctrl-C here; a killed one alike) keeps what it measured. The lab is replaced: this
    checks the command's bookkeeping, not a migration."""
    import json

    import sealift.bench.harness as harness
    from sealift.bench.results import RunResult
    from sealift.cli.bench_cmd import cmd_bench

    def two_runs_then_ctrl_c(plan, progress=None, on_run=None):  # type: ignore[no-untyped-def]
        runs: list[RunResult] = []
        for transport, total in (("plain", 2.0), ("sealift", 2.5)):
            runs.append(
                RunResult(
                    transport,
                    "qemu",
                    256,
                    "idle",
                    1500,
                    0,
                    total_time_s=total,
                    downtime_ms=40.0,
                    bytes=1 << 20,
                    cpu_s=1.0,
                    peak_cpu_pct=90.0,
                )
            )
            on_run(runs)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_plan", two_runs_then_ctrl_c)
    out = tmp_path / "partial"
    assert cmd_bench(parse("--sizes", "256M", "--backends", "qemu", "--out", str(out))) == 130
    saved = json.loads((out / "results.json").read_text())
    assert [(r["transport"], r["ratio_to_plain"]) for r in saved["runs"]] == [("plain", 1.0), ("sealift", 1.25)]
    assert "Migration time (s)" in (out / "results.md").read_text()


def test_the_debian_backend_adds_one_serving_cell_per_size_at_mtu_1500() -> None:
    plan = build_plan(
        parse("--backends", "qemu,debian", "--sizes", "1G", "--workloads", "moderate", "--disk-fill", "256")
    )
    assert plan.cells == [Cell("qemu", 1024, "moderate", 1500), Cell("debian", 1024, "serving", 1500, fill_mib=256)]
    command = canonical_command(parse("--backends", "debian", "--sizes", "1G", "--disk-fill", "256"))
    assert "--disk-fill 256" in command
    assert build_plan(build_parser().parse_args(command.split()[1:])).cells == [
        Cell("debian", 1024, "serving", 1500, fill_mib=256)
    ]


def test_the_debian_backend_refuses_what_its_lab_cannot_do() -> None:
    from sealift.bench.harness import BenchError

    with pytest.raises(BenchError, match="MTU 1500 only"):
        build_plan(parse("--backends", "debian", "--mtu", "9000"))
    with pytest.raises(BenchError, match="must not be negative"):
        build_plan(parse("--backends", "debian", "--disk-fill", "-1"))
    with pytest.raises(BenchError, match="unknown backend"):
        build_plan(parse("--backends", "xen"))
