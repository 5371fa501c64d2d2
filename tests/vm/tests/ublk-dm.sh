#!/bin/bash
# ublk: a ublk device under the kernel's device-mapper (linear), with ext4 on top; the dm
# holder makes a safe delete report busy.
. "$(dirname "$0")/ublk-lib.sh"
need_ext4

start_server dm --backend memory --size 96M -q 2
sectors=$(blockdev --getsz "$DEV")
dmsetup create ublkdm --table "0 $((sectors - 2048)) linear $DEV 2048" || fail "dmsetup create"
[[ -b /dev/mapper/ublkdm ]] || dmsetup mknodes
mkfs.ext4 -q -F /dev/mapper/ublkdm || fail "mkfs on dm"
mkdir -p "$WORK/mnt"
mount /dev/mapper/ublkdm "$WORK/mnt" || fail "mount dm"
for i in 1 2 3; do head -c $((2 << 20)) /dev/urandom >"$WORK/mnt/f$i"; done
(cd "$WORK/mnt" && sha256sum f* >"$WORK/sums")
umount "$WORK/mnt"
mount /dev/mapper/ublkdm "$WORK/mnt"
(cd "$WORK/mnt" && sha256sum -c --quiet "$WORK/sums") || fail "files differ after remount"
umount "$WORK/mnt"
ok "ext4 on dm-linear on $DEV"
ls "/sys/block/ublkb$ID/holders/"
err=$(timeout 20 "$UBLK_SERVE" --delete "$ID" 2>&1) && fail "deleted a device under dm"
echo "$err"
grep -q "is busy" <<<"$err" || fail "unclear busy error: $err"
ok "device under dm reported busy"
dmsetup remove ublkdm
stop_server "$SERVER_PID" dm
echo PASS
