"""A VM's normal behaviour for one signal: EWMA mean and variance, in log space.

Rates of VM activity span orders of magnitude (an idle guest dirties a few
KiB/s, a database hundreds of MiB/s) and their noise is roughly
proportional to their level, so the baseline is learnt on
``log1p(value / scale)``: a deviation then reads as "how many times the
usual level", whatever the level is. ``scale`` is the size below which a
signal counts as noise (e.g. 64 KiB/s of dirty memory).

Why EWMA: it is a sliding window without storing the window (memory O(1)
per signal), and it follows slow drift. Two guards keep it honest:

- a *warm-up*: the first ``warmup`` samples only learn (cumulative average,
  so the mean is right quickly) and never score;
- an anomalous sample is learnt with a much smaller weight, so a sustained
  attack is not absorbed into "normal" within a few samples, while a real,
  lasting change of workload is accepted over minutes.

The standard deviation used for scoring is floored (``min_std``, in log
units: 0.15 means ~16 % of the level), so a perfectly steady signal does not
turn a 1 % wobble into a huge z-score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BaselineConfig:
    half_life: float = 60.0  # samples: the window the baseline remembers
    warmup: int = 20  # samples before any scoring
    anomaly_weight: float = 0.05  # learning weight of an anomalous sample (x the normal one)
    z_threshold: float = 4.0  # |z| at or above which a sample is anomalous
    min_ratio: float = 2.0  # and at least this many times the normal level
    min_std: float = 0.15  # floor of the std in log units

    def __post_init__(self) -> None:
        if not self.half_life > 0:
            raise ValueError("half_life must be positive")
        if self.warmup < 1:
            raise ValueError("warmup must be at least 1 sample")
        if not 0 <= self.anomaly_weight <= 1:
            raise ValueError("anomaly_weight must be within [0, 1]")
        if not (self.z_threshold > 0 and self.min_ratio >= 1 and self.min_std > 0):
            raise ValueError("z_threshold and min_std must be positive, min_ratio at least 1")

    @property
    def alpha(self) -> float:
        """EWMA weight of one sample, from the half-life in samples."""
        return 1.0 - 0.5 ** (1.0 / self.half_life)


@dataclass(frozen=True)
class Score:
    """How one sample compares with the baseline."""

    value: float  # the raw sample
    normal: float  # the baseline level, in the signal's units (geometric mean)
    z: float  # deviation in (floored) standard deviations, log space; 0 during warm-up
    ratio: float  # (value + scale) / (normal + scale)
    anomalous: bool  # rising: z and ratio both past their thresholds
    warm: bool  # the baseline had finished its warm-up


class EwmaBaseline:
    """One signal's baseline. Not thread-safe (the host monitor owns it)."""

    __slots__ = ("_config", "_scale", "_mean", "_var", "_count")

    def __init__(self, config: BaselineConfig, scale: float) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        self._config = config
        self._scale = scale
        self._mean = 0.0
        self._var = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def warm(self) -> bool:
        return self._count >= self._config.warmup

    @property
    def normal(self) -> float:
        """The learnt level in the signal's units."""
        return self._scale * math.expm1(self._mean)

    @property
    def std(self) -> float:
        """The learnt spread in log units (not floored)."""
        return math.sqrt(self._var)

    def observe(self, value: float) -> Score:
        """Score `value` against what was learnt so far, then learn from it."""
        if not math.isfinite(value):
            raise ValueError(f"sample must be finite, got {value!r}")
        x = math.log1p(max(0.0, value) / self._scale)
        warm = self.warm
        if warm:
            std = max(self.std, self._config.min_std)
            z = (x - self._mean) / std
            ratio = math.exp(x - self._mean)
            anomalous = z >= self._config.z_threshold and ratio >= self._config.min_ratio
        else:
            z, ratio, anomalous = 0.0, 1.0, False
        score = Score(value, self.normal, z, ratio, anomalous, warm)
        self._learn(x, anomalous)
        return score

    def _learn(self, x: float, anomalous: bool) -> None:
        self._count += 1
        alpha = self._config.alpha
        if self._count <= self._config.warmup:
            alpha = max(alpha, 1.0 / self._count)  # cumulative average while warming up
        elif anomalous:
            alpha *= self._config.anomaly_weight
        diff = x - self._mean
        increment = alpha * diff
        self._mean += increment
        self._var = (1.0 - alpha) * (self._var + diff * increment)
