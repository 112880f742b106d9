"""The one compiled part of sealift: the native relay core (src/sealift/host/_relaycore.c).

Everything else is in pyproject.toml. The extension links Debian's libssl-dev
(OpenSSL's EVP AES-256-GCM, which uses AES-NI/VAES); `pip install -e .`
builds it in place, next to its Python wrapper (sealift/host/relaycore.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sealift.host._relaycore",
            sources=["src/sealift/host/_relaycore.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        )
    ]
)
