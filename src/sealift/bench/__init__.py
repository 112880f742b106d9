"""`sealift bench`: sealift against the real alternatives (plain TCP, QEMU TLS, SSH, IPsec) on the lab testbed."""
