#!/bin/bash
# ublk: memory and file devices: raw checksums, mkfs.ext4 + mount + files, clean stop.
. "$(dirname "$0")/ublk-lib.sh"

echo "kernel $(uname -r); features: $("$UBLK_SERVE" --features)"

start_server mem --backend memory --size 128M -q 2
# Queue threads are pinned, IO flushers, SCHED_BATCH, in private mount namespaces: no warnings.
if grep -E "warning|cannot|failed" "$WORK/mem.log"; then fail "server warned while starting"; fi
for t in /proc/"$SERVER_PID"/task/*; do
	[[ $(cat "$t/comm") == ublk${ID}q* ]] || continue
	[[ $(readlink "$t/ns/mnt") != $(readlink /proc/self/ns/mnt) ]] || fail "queue thread $t shares our mount namespace"
	# Field 41 of stat is the scheduling policy; 3 is SCHED_BATCH.
	[[ $(awk '{ print $41 }' "$t/stat") == 3 ]] || fail "queue thread $t is not SCHED_BATCH"
	echo "$(cat "$t/comm"): cpus $(awk '/Cpus_allowed_list/ { print $2 }' "$t/status"), mnt $(readlink "$t/ns/mnt")"
done
ok "queue threads pinned, SCHED_BATCH and in their own mount namespace"
[[ $(blockdev --getsize64 "$DEV") -eq $((128 << 20)) ]] || fail "wrong size $(blockdev --getsize64 "$DEV")"
head -c $((8 << 20)) /dev/urandom >"$WORK/pattern"
dd if="$WORK/pattern" of="$DEV" bs=1M oflag=direct status=none
want=$(sha256sum <"$WORK/pattern" | cut -d' ' -f1)
got=$(dd if="$DEV" bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $got == "$want" ]] || fail "raw read back differs"
ok "raw 8 MiB write/read round trip"

need_ext4
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mkdir -p "$WORK/mnt"
mount "$DEV" "$WORK/mnt" || fail "mount"
for i in 1 2 3 4; do head -c $((1 << 20)) /dev/urandom >"$WORK/mnt/f$i"; done
(cd "$WORK/mnt" && sha256sum f* >"$WORK/sums")
umount "$WORK/mnt"
mount "$DEV" "$WORK/mnt" || fail "remount"
(cd "$WORK/mnt" && sha256sum -c --quiet "$WORK/sums") || fail "files changed across remount"
umount "$WORK/mnt"
fsck.ext4 -n -f "$DEV" >/dev/null || fail "fsck found errors"
ok "ext4 mkfs, mount, files, remount, fsck"
stop_server "$SERVER_PID" mem
[[ ! -e $DEV ]] || fail "$DEV still exists after stop"
[[ ! -e /dev/ublkc$ID ]] || fail "/dev/ublkc$ID still exists after stop"
ok "stop removes the device"

truncate -s 64M "$WORK/disk.img"
start_server file --backend file --file "$WORK/disk.img"
dd if="$WORK/pattern" of="$DEV" bs=1M oflag=direct status=none
sync
head -c $((8 << 20)) "$WORK/disk.img" >"$WORK/stored"
cmp "$WORK/stored" "$WORK/pattern" || fail "file backend did not store the data"
ok "file backend stores writes in the file"
stop_server "$SERVER_PID" file
echo PASS
