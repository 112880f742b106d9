"""`sealift vm`: start, list, show, check and stop VMs on an agent."""

from __future__ import annotations

import argparse
from pathlib import Path

from sealift.cli.common import agent_command, client, print_json
from sealift.cli.render import out, vm_table


def add_vm_parser(sub: argparse._SubParsersAction) -> None:
    vm = sub.add_parser("vm", help="manage VMs on an agent").add_subparsers(dest="vm_command", required=True)
    p = vm.add_parser("start", help="start a VM (built-in, or a real QEMU guest)")
    p.add_argument("name")
    p.add_argument(
        "--backend",
        default="builtin",
        choices=["builtin", "qemu"],
        help="builtin (default) or qemu (the test guest image, built on first use)",
    )
    p.add_argument("--image", default=None, help="QEMU guest image cache directory (default: the agent's)")
    p.add_argument("--memory", default="256M", help="RAM size, e.g. 256M, 1G, 4G (default 256M)")
    p.add_argument("--workload", default="db", choices=["idle", "web", "db", "stress"])
    p.add_argument("--fill", type=float, default=0.5, help="share of RAM filled with data at boot (default 0.5)")
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH[,shared]",
        help="qemu: attach a qcow2 or raw image as a virtio disk (repeatable; ',shared': both hosts see PATH, "
        "a migration does not copy it)",
    )
    p.add_argument(
        "--nic",
        default=None,
        metavar="none|user|tap=TAP,ip=ADDR/LEN[,gw=GW]|bridge=BR,ip=ADDR/LEN[,gw=GW]",
        help="qemu: the network (default user: a host UDP port forwarded to the guest's probe service; "
        "tap=: an existing tap; bridge=: the agent makes a tap on that bridge on every host the guest runs on)",
    )
    p.add_argument(
        "--guest",
        default="sealift",
        choices=["sealift", "debian"],
        help="qemu: sealift's test guest (default), or debian: Debian 12 with nginx and redis on a disk of its "
        "own (built on first use; started from its saved booted state when the machine matches)",
    )
    p.add_argument("--cpus", type=int, default=1, help="qemu: vCPUs (default 1)")
    p.add_argument(
        "--cmdline", "--append", default="", help="qemu: extra guest kernel arguments (e.g. sealift.disk=write)"
    )
    p.add_argument("--kernel", default=None, help="qemu: boot this kernel instead of sealift's guest image")
    p.add_argument("--initrd", default=None, help="qemu: the initramfs that goes with --kernel")
    p.add_argument(
        "--boot",
        default=None,
        choices=["disk"],
        help="qemu: disk = no -kernel: the firmware (BIOS) boots the first --disk with its own boot loader "
        "(its kernel command line is on that disk, so --cmdline does not apply)",
    )
    p.add_argument(
        "--firmware",
        default=None,
        metavar="PATH",
        help="qemu, with --boot disk: the BIOS image (default SeaBIOS, /usr/share/seabios/bios-256k.bin); "
        "the destination of a migration must hold the very same file",
    )
    agent_command(p, cmd_vm_start)
    for name, func, helptext in (
        ("info", cmd_vm_info, "show one VM"),
        ("check", cmd_vm_check, "verify a VM's memory from inside (pages and secret)"),
        ("stop", cmd_vm_stop, "stop a VM and delete its image"),
    ):
        p = vm.add_parser(name, help=helptext)
        p.add_argument("name")
        agent_command(p, func)
    p = vm.add_parser("list", help="list VMs")
    agent_command(p, cmd_vm_list)


def cmd_vm_start(args: argparse.Namespace) -> int:
    fields: dict[str, object] = {"backend": args.backend}
    if args.image is not None:
        fields["image_cache"] = str(Path(args.image).resolve())
    if args.backend == "qemu":
        fields.update(disks=[_absolute_disk(d) for d in args.disk], cpus=args.cpus, cmdline=args.cmdline)
        if args.guest != "sealift":
            fields["guest"] = args.guest
        if args.boot == "disk":
            if args.kernel is not None or args.initrd is not None or args.cmdline:
                raise SystemExit(
                    "--boot disk boots the disk's own boot loader: leave out --kernel, --initrd, --cmdline"
                )
            fields["boot"] = "disk"
            if args.firmware is not None:
                fields["firmware"] = str(Path(args.firmware).resolve())
        elif args.firmware is not None:
            raise SystemExit("--firmware goes with --boot disk")
        elif args.kernel is not None or args.initrd is not None:
            if args.kernel is None or args.initrd is None:
                raise SystemExit("--kernel and --initrd go together")
            fields.update(kernel=str(Path(args.kernel).resolve()), initrd=str(Path(args.initrd).resolve()))
        net = parse_nic(args.nic) if args.nic is not None else None
        if net is not None:
            fields["net"] = net
    elif (
        args.disk
        or args.nic is not None
        or args.cpus != 1
        or args.kernel
        or args.initrd
        or args.boot
        or args.firmware
        or args.guest != "sealift"
    ):
        raise SystemExit(
            "--disk, --nic, --cpus, --guest, --kernel, --initrd, --boot and --firmware are for --backend qemu"
        )
    reply = client(args).request(
        "vm.start",
        on_event=None,
        name=args.name,
        memory=args.memory,
        workload=args.workload,
        fill_fraction=args.fill,
        **fields,
    )
    return _show_vms(args, reply["vm"], [reply["vm"]])


def _absolute_disk(text: str) -> str:
    """The agent resolves nothing relative to its own directory: send an absolute path."""
    path, sep, option = text.partition(",")
    return str(Path(path).resolve()) + sep + option


def parse_nic(text: str) -> dict[str, object] | None:
    """--nic as the agent's net object (None for user: the agent's default)."""
    if text == "user":
        return None
    if text == "none":
        return {"mode": "none"}
    fields = dict(part.partition("=")[::2] for part in text.split(","))
    if set(fields) - {"tap", "bridge", "ip", "gw"} or len({"tap", "bridge"} & set(fields)) != 1 or "ip" not in fields:
        raise SystemExit(f"--nic {text!r}: use none, user, tap=TAP,ip=ADDR/LEN[,gw=GW] or bridge=BR,ip=...")
    return {
        "mode": "tap",
        "tap": fields.get("tap"),
        "bridge": fields.get("bridge"),
        "guest_ip": fields["ip"],
        "gateway": fields.get("gw") or None,
    }


def cmd_vm_list(args: argparse.Namespace) -> int:
    reply = client(args).request("vm.list")
    return _show_vms(args, reply["vms"], reply["vms"])


def _show_vms(args: argparse.Namespace, result: object, vms: list[dict]) -> int:
    """With --json the agent's answer as it came (one VM or the list), else the VMs as a table."""
    if args.json:
        print_json(result)
    else:
        out.print(vm_table(vms))
    return 0


def cmd_vm_info(args: argparse.Namespace) -> int:
    reply = client(args).request("vm.info", name=args.name)
    return _show_vms(args, reply["vm"], [reply["vm"]])


def cmd_vm_check(args: argparse.Namespace) -> int:
    check = client(args).request("vm.check", name=args.name)["check"]
    ok = check["bad_page_count"] == 0 and check["secret_intact"]
    if args.json:
        print_json({**check, "ok": ok})
    else:
        color = "green" if ok else "red"
        out.print(
            f"[{color}]{args.name}: {check['pages_checked']} pages checked, {check['bad_page_count']} bad, "
            f"secret {'intact' if check['secret_intact'] else 'ALTERED'}[/{color}]"
        )
    return 0 if ok else 1


def cmd_vm_stop(args: argparse.Namespace) -> int:
    client(args).request("vm.stop", name=args.name)
    if args.json:
        print_json({"stopped": args.name})
    else:
        out.print(f"stopped {args.name}")
    return 0
