"""Migration options an operator can set, with QEMU-like defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sealift.errors import SealiftError

COMPRESSION_CODECS = ("zstd", "lz4")
IMAGE_DIGESTS = ("tags", "blake3")
# When a QEMU migration switches to post-copy (backends/qemu/postcopy.py): never, after `postcopy_after_s` of
# pre-copy, after the first full pass, or once the guest dirties at least what the link carries for several passes.
POSTCOPY_MODES = ("off", "after-timeout", "after-precopy", "on-stall")


class OptionsError(SealiftError, ValueError):
    """A migration option is out of range."""

    code = "options_error"


@dataclass(frozen=True)
class MigrationOptions:
    downtime_limit_ms: int = 300
    bandwidth_limit_bps: int | None = None  # bytes per second; None = unlimited
    max_rounds: int = 30
    zero_page_elision: bool = True
    compression: str | None = None  # off by default, as in QEMU
    auto_converge: bool = False
    secure: bool = True  # False only for the measured plaintext baseline
    image_digest: str = "tags"  # the end-to-end image check (backends/builtin/digest.py)
    # QEMU guests only (backends/qemu/source.py); the built-in engine has its own streams.
    multifd_channels: int = 0  # QEMU multifd: 0 = off, else that many parallel connections
    xbzrle: bool = False  # QEMU's XOR+RLE delta compression of re-sent pages
    xbzrle_cache_bytes: int | None = None  # None: QEMU's default (64 MiB)
    # Give up a QEMU pre-copy that has not reached its switchover after this long (KubeVirt's completion
    # timeout): the guest never stopped and keeps running on the source. None: no limit, as in QEMU.
    completion_timeout_s: float | None = None
    postcopy: str = "off"  # one of POSTCOPY_MODES; QEMU guests on the sealift transport only
    postcopy_after_s: float = 10.0  # "after-timeout": seconds of pre-copy before the switch
    # What the completion timeout does (KubeVirt's allowPostCopy): "abort" the pre-copy (the guest stays),
    # or "postcopy": switch to post-copy then (QEMU guests on the sealift transport).
    completion_action: str = "abort"

    def __post_init__(self) -> None:
        if not 1 <= self.downtime_limit_ms <= 60_000:
            raise OptionsError(f"downtime limit {self.downtime_limit_ms} ms is outside 1..60000 ms")
        if self.bandwidth_limit_bps is not None and self.bandwidth_limit_bps < 1 << 20:
            raise OptionsError("bandwidth limit must be at least 1 MiB/s")
        if not 1 <= self.max_rounds <= 1000:
            raise OptionsError(f"max rounds {self.max_rounds} is outside 1..1000")
        if self.compression is not None and self.compression not in COMPRESSION_CODECS:
            raise OptionsError(f"unknown compression {self.compression!r}; use one of {COMPRESSION_CODECS}")
        if self.image_digest not in IMAGE_DIGESTS:
            raise OptionsError(f"unknown image digest {self.image_digest!r}; use one of {IMAGE_DIGESTS}")
        if not 0 <= self.multifd_channels <= 64:
            raise OptionsError(f"multifd channels {self.multifd_channels} is outside 0..64")
        if self.xbzrle and self.multifd_channels:
            raise OptionsError("xbzrle and multifd do not combine: QEMU's multifd channels send whole pages")
        if self.completion_timeout_s is not None and not 1 <= self.completion_timeout_s <= 86_400:
            raise OptionsError(f"completion timeout {self.completion_timeout_s} s is outside 1..86400 s")
        if self.postcopy not in POSTCOPY_MODES:
            raise OptionsError(f"unknown post-copy mode {self.postcopy!r}; use one of {POSTCOPY_MODES}")
        if self.postcopy != "off" and self.multifd_channels:
            raise OptionsError("post-copy and multifd do not combine in QEMU 7.2")
        if self.completion_action not in ("abort", "postcopy"):
            raise OptionsError(f"completion action {self.completion_action!r} is not 'abort' or 'postcopy'")
        if self.completion_action == "postcopy" and self.completion_timeout_s is None:
            raise OptionsError("completion action 'postcopy' needs a completion timeout")
        if self.completion_action == "postcopy" and self.postcopy not in ("off", "after-timeout"):
            raise OptionsError(f"completion action 'postcopy' and post-copy mode {self.postcopy!r} do not combine")
        if self.completion_action == "postcopy" and self.multifd_channels:
            raise OptionsError("post-copy and multifd do not combine in QEMU 7.2")
        if not 0 <= self.postcopy_after_s <= 86_400:
            raise OptionsError(f"post-copy switch time {self.postcopy_after_s} s is outside 0..86400 s")
        if self.xbzrle_cache_bytes is not None and self.xbzrle_cache_bytes < 1 << 20:
            raise OptionsError("the xbzrle cache must be at least 1 MiB")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> MigrationOptions:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]  # JSON values: __post_init__ checks them
