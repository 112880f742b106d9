"""The built-in VM: a guest process whose whole state is a shared-memory image.

See ``docs/architecture.md`` ("The built-in VM") and the module docstrings of
``image`` (file layout, state area), ``dirtylog`` (dirty-tracking protocol),
``workload`` (profiles, page format), ``guest`` (the process) and ``vm``
(the agent-side handle).
"""

from sealift.backends.builtin.dirtylog import DirtyLog, DirtyLogError
from sealift.backends.builtin.image import (
    DEFAULT_SECRET,
    PAGE_SIZE,
    SECRET_PAGE,
    STATE_AREA_SIZE,
    GuestImage,
    GuestState,
    ImageCheck,
    ImageError,
)
from sealift.backends.builtin.vm import BuiltinVM, VmError
from sealift.backends.builtin.workload import PROFILES, WorkloadParams, WorkloadProfile, pages_for_tick

__all__ = [
    "DEFAULT_SECRET",
    "PAGE_SIZE",
    "PROFILES",
    "SECRET_PAGE",
    "STATE_AREA_SIZE",
    "BuiltinVM",
    "DirtyLog",
    "DirtyLogError",
    "GuestImage",
    "GuestState",
    "ImageCheck",
    "ImageError",
    "VmError",
    "WorkloadParams",
    "WorkloadProfile",
    "pages_for_tick",
]
