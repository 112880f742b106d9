"""The libvirt backend's error."""

from __future__ import annotations

from sealift.errors import SealiftError


class LibvirtError(SealiftError):
    """libvirt refused or failed, a domain is not there, or a lab host would not start."""

    code = "libvirt_error"
