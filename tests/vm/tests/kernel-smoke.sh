#!/bin/bash
# The guest kernel has ublk, device-mapper (dmsetup) and working loop devices.
set -euo pipefail

fail() {
	echo "FAIL: $*"
	exit 1
}

echo "kernel $(uname -r) (VM_KERNEL=$VM_KERNEL)"
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control missing (ublk_drv not loaded?)"
echo "ok: /dev/ublk-control"
[[ -c /dev/mapper/control ]] || fail "/dev/mapper/control missing (dm-mod not loaded?)"

targets=$(dmsetup targets) || fail "dmsetup targets failed"
echo "$targets"
for t in linear striped error zero delay flakey; do
	grep -q "^$t " <<<"$targets" || fail "device-mapper target '$t' missing"
done
echo "ok: dmsetup targets"

img=/tmp/kernel-smoke.img
truncate -s 16M "$img"
loop=$(losetup -f --show "$img") || fail "losetup failed"
trap 'dmsetup remove smoke 2>/dev/null || true; losetup -d "$loop" 2>/dev/null || true; rm -f "$img"' EXIT
echo "loop device: $loop"
printf 'userdm-smoke' | dd of="$loop" bs=512 seek=8 conv=notrunc,fsync status=none
dmsetup create smoke --table "0 32768 linear $loop 0"
got=$(dd if=/dev/mapper/smoke bs=512 skip=8 count=1 status=none | head -c 12)
[[ $got == userdm-smoke ]] || fail "read through dm linear gave '$got'"
echo "ok: loop + dm linear round trip"
for f in /dev/nbd0 /dev/cuse /sys/module/null_blk; do
	[[ -e $f ]] && echo "ok: $f" || echo "note: $f missing"
done
echo "PASS"
