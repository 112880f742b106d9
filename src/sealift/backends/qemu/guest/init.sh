#!/bin/busybox sh
# sealift guest init (PID 1 of the test guest's initramfs).
#
# Mounts the kernel's file systems, loads the few modules the Debian kernel
# builds as modules (virtio PCI and network, listed in dependency order by
# the image builder), brings up eth0 with a static address from the kernel
# command line, then runs the workload. PID 1 must never exit (the kernel
# would panic), so if the workload dies init says so and stays alive.
#
# Command line:
#   sealift.ip=10.0.2.15/24   eth0's address ("none": leave eth0 down)
#   sealift.gw=10.0.2.2       default gateway ("none": no default route)
#   sealift.disk=write        write numbered records to /dev/vda for ever (the
#                             storage migration tests: see disk_writer below)

/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

say() { echo "sealift-init: $*"; }

while read -r module; do
    insmod "/lib/modules/$module" || say "insmod $module failed"
done < /etc/sealift/modules

ip_addr=10.0.2.15/24
gateway=10.0.2.2
for word in $(cat /proc/cmdline); do
    case "$word" in
        sealift.ip=*) ip_addr="${word#sealift.ip=}" ;;
        sealift.gw=*) gateway="${word#sealift.gw=}" ;;
        sealift.disk=write) disk_write=yes ;;
    esac
done

# Record n is the 4 KiB block 8192 + n % 8192 of /dev/vda (from 32 MiB on), holding
# "sealift-disk-record n", written with fsync, so each one has reached QEMU
# before the next begins. A test reads both images after a migration: every
# record the source wrote before the switchover must be on the destination.
disk_writer() {
    tries=0
    while [ ! -b /dev/vda ] && [ "$tries" -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    [ -b /dev/vda ] || { say "sealift.disk=write but no /dev/vda"; return; }
    n=0
    while :; do
        printf 'sealift-disk-record %010d\n' "$n" |
            dd of=/dev/vda bs=4096 seek=$((8192 + n % 8192)) conv=notrunc,sync,fsync 2>/dev/null ||
            say "disk record $n failed"
        [ $((n % 10)) -eq 0 ] && echo "sealift-disk $n"
        n=$((n + 1))
    done
}

ip link set lo up
# The NIC's driver probes asynchronously after insmod: give it a moment.
tries=0
while [ ! -e /sys/class/net/eth0 ] && [ "$tries" -lt 50 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
if [ "$ip_addr" = none ]; then
    say "network left down (sealift.ip=none)"
elif [ ! -e /sys/class/net/eth0 ]; then
    say "no eth0: the VM has no network device"
else
    ip addr add "$ip_addr" dev eth0 && ip link set eth0 up
    [ "$gateway" = none ] || ip route add default via "$gateway"
    say "eth0 $ip_addr gateway $gateway mac $(cat /sys/class/net/eth0/address)"
fi

[ "$disk_write" = yes ] && disk_writer &

say "starting workload ($(grep MemAvailable /proc/meminfo | tr -s ' '))"
/bin/workload
say "workload exited with status $?; staying alive"
while :; do sleep 3600; done
