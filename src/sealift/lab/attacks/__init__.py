"""The lab's attacks, one module per group of threats; importing this registers them all."""

from sealift.lab.attacks import (  # noqa: F401  (T1-T4, T13; T8, T11)  # noqa: F401  (T5, T6, T7, T9, T10; T12)
    admission,
    channel,
    ipsec,  # noqa: F401  (T1, T4, T13 on QEMU's ipsec transport)
    monitoring,
    postcopy,  # noqa: F401  (T1, T2, T11 on a QEMU post-copy and its return path)
    resilience,
    storage,  # noqa: F401  (T1, T2 on a QEMU guest's disk stream)
)
