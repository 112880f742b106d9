"""`sealift image build`: the QEMU test guest image (the build itself is backends.qemu.image's)."""

from __future__ import annotations

import argparse


def add_image_parser(sub: argparse._SubParsersAction) -> None:
    from sealift.backends.qemu.image import add_build_arguments, cli_build

    p = sub.add_parser("image", help="the QEMU test guest image").add_subparsers(dest="image_command", required=True)
    p = p.add_parser("build", help="build (or find in the cache) the QEMU guest image")
    add_build_arguments(p)
    p.set_defaults(func=cli_build)
