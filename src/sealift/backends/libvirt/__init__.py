"""libvirt domains: sealift carries every socket of libvirt's own migration (issue 19)."""
