"""`sealift image build`: the QEMU guest images (the builds themselves are backends.qemu's)."""

from __future__ import annotations

import argparse


def add_image_parser(sub: argparse._SubParsersAction) -> None:
    from sealift.backends.qemu.image import add_build_arguments

    p = sub.add_parser("image", help="the QEMU guest images").add_subparsers(dest="image_command", required=True)
    p = p.add_parser("build", help="build (or find in the cache) a QEMU guest image")
    add_build_arguments(p)
    p.add_argument(
        "--guest",
        choices=("test", "debian"),
        default="test",
        help="test: the busybox guest running sealift's workload (default); "
        "debian: Debian 12 with nginx and redis (debootstrap, root)",
    )
    p.add_argument(
        "--saved-state",
        action="store_true",
        help="debian: also boot the image once and save the booted guest, so guests start in seconds (root)",
    )
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    if args.guest == "debian":
        from sealift.backends.qemu.debian_guest import cli_build_debian

        return cli_build_debian(args)
    from sealift.backends.qemu.image import cli_build

    return int(cli_build(args))
