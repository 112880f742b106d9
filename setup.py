"""The one compiled part of sealift: the native relay core (src/sealift/host/_relaycore.c).

Everything else is in pyproject.toml. The extension links Debian's
libipsec-mb-dev (Intel's ipsec-mb: AES-256-GCM with VAES/AVX-512, picked per
CPU at run time) and libssl-dev (OpenSSL: HMAC for the rekey, constant-time
compare); `pip install -e .` builds it in place, next to its Python wrapper
(sealift/host/relaycore.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sealift.host._relaycore",
            sources=["src/sealift/host/_relaycore.c"],
            libraries=["IPSec_MB", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        )
    ]
)
