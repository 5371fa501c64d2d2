#!/bin/bash
# ublk: growing the backing file and telling the kernel (UPDATE_SIZE, Linux 6.16+) grows the
# live device under a mounted filesystem; older kernels say the feature is missing.
. "$(dirname "$0")/ublk-lib.sh"
need_ext4

truncate -s 64M "$WORK/disk.img"
start_server grow --backend file --file "$WORK/disk.img"
mkfs.ext4 -q -F "$DEV"
mkdir -p "$WORK/mnt"
mount "$DEV" "$WORK/mnt"
head -c $((4 << 20)) /dev/urandom >"$WORK/mnt/before"
truncate -s 128M "$WORK/disk.img"
kill -USR1 "$SERVER_PID"
sleep 1
if kernel_at_least 6 16; then
	for ((i = 0; i < 50; i++)); do
		[[ $(blockdev --getsize64 "$DEV") -eq $((128 << 20)) ]] && break
		sleep 0.1
	done
	[[ $(blockdev --getsize64 "$DEV") -eq $((128 << 20)) ]] || fail "size is $(blockdev --getsize64 "$DEV") after UPDATE_SIZE"
	resize2fs "$DEV" >/dev/null 2>&1 || fail "resize2fs"
	head -c $((80 << 20)) /dev/zero >"$WORK/mnt/big" || fail "cannot use the grown space"
	ok "device grew to 128M live; ext4 resized online"
else
	grep -q "UBLK_F_UPDATE_SIZE, Linux 6.16 or later" "$WORK/grow.log" || fail "no clear message: $(cat "$WORK/grow.log")"
	ok "kernel without UPDATE_SIZE: clear message"
fi
umount "$WORK/mnt"
stop_server "$SERVER_PID" grow
echo PASS
