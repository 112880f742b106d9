"""Synthetic VM behaviour for the monitor's unit tests: rates in, cumulative samples out."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

from sealift.monitor.signals import VmSample

Rates = dict[str, float]  # cpu (cores), dirty_bps, rx_bps, tx_bps (bytes/s), rx_pps, tx_pps


def samples(
    rates_at: Callable[[int], Rates],
    count: int,
    vm: str = "vm1",
    period: float = 1.0,
    network: bool = True,
    start: int = 0,
) -> Iterator[VmSample]:
    """`count` samples whose rates between consecutive samples are `rates_at(i)`."""
    cpu = 0.0
    dirty = 0
    net = {"rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0}
    for i in range(start, start + count):
        r = rates_at(i)
        cpu += r["cpu"] * period
        dirty += int(r["dirty_bps"] * period / 4096)
        if network:
            net["rx_bytes"] += int(r["rx_bps"] * period)
            net["tx_bytes"] += int(r["tx_bps"] * period)
            net["rx_packets"] += int(r["rx_pps"] * period)
            net["tx_packets"] += int(r["tx_pps"] * period)
        yield VmSample(
            vm=vm,
            backend="qemu",
            time=i * period,
            pid=1000,
            alive=True,
            status="running",
            cpu_seconds=cpu,
            progress=i,
            dirty_pages=dirty,
            **({k: v for k, v in net.items()} if network else {}),
        )


def quiet_web_server(
    seed: int,
    drift: float = 1.5,
    drift_period: int = 6 * 3600,
    noise: float = 0.15,
    step_every: int = 900,
    step_max: float = 1.4,
) -> Callable[[int], Rates]:
    """A VM doing its normal job, in three layers of normal change:

    - noise: every rate lognormal around its level (`noise` sigma: 0.15 ~ +-15 %);
    - slow drift: a diurnal-like swing between 1/`drift` and `drift` x over `drift_period` samples;
    - modest workload changes: every `step_every` samples the level moves by a
      factor within [1/`step_max`, `step_max`] (kept within 0.5-2x of the base).
    """
    rng = random.Random(seed)
    base = {"cpu": 0.15, "dirty_bps": 4 * 2**20, "rx_bps": 200e3, "tx_bps": 800e3, "rx_pps": 400.0, "tx_pps": 600.0}
    level = 1.0

    def rates_at(i: int) -> Rates:
        nonlocal level
        if i % step_every == 0 and i > 0:
            level = min(2.0, max(0.5, level * math.exp(rng.uniform(-math.log(step_max), math.log(step_max)))))
        swing = drift ** math.sin(2 * math.pi * i / drift_period)
        return {k: v * level * swing * math.exp(rng.gauss(0, noise)) for k, v in base.items()}

    return rates_at


def with_burst(quiet: Callable[[int], Rates], start: int, end: int, factors: Rates) -> Callable[[int], Rates]:
    """`quiet` behaviour with the signals in `factors` multiplied during [start, end)."""

    def rates_at(i: int) -> Rates:
        r = dict(quiet(i))
        if start <= i < end:
            for k, f in factors.items():
                r[k] *= f
        return r

    return rates_at
