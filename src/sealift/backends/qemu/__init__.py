"""The QEMU backend: a small Debian-kernel test guest (``image``) and QEMU VMs driven over QMP (``vm``)."""
