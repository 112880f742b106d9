"""VM backends: what a VM is to sealift (the built-in guest; QEMU later)."""
