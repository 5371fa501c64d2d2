#!/bin/bash
# The kernel's own NBD client on a userdm NBD export: nbd-client (2 connections) → /dev/nbd0
# → ext4, files read back across suspend/reload/resume; an export added to the running device
# with `userdm export` read through /dev/nbd1; NBD clients count as openers.
# vm-timeout: 600
. "$USERDM_REPO/tests/vm/lib/cli-lib.sh"
need_ext4
command -v nbd-client >/dev/null || skip "nbd-client is not installed on the host"
[[ -b /dev/nbd0 ]] || load_module nbd
[[ -b /dev/nbd0 ]] || udev_settle /dev/nbd0

nbd_cleanup() {
	set +e
	umount "$MNT" 2>/dev/null
	nbd-client -d /dev/nbd0 >/dev/null 2>&1
	nbd-client -d /dev/nbd1 >/dev/null 2>&1
	cli_cleanup
}
trap nbd_cleanup EXIT

truncate -s 128M "$WORK/disk.img"
"$U" create k0 --table "0 262144 linear $WORK/disk.img 0" --export nbd:tcp:127.0.0.1:10809 ||
	fail "create k0 with an NBD export"
nbd-client -N k0 -C 2 127.0.0.1 10809 /dev/nbd0 || fail "nbd-client could not connect"
[[ $(blockdev --getsize64 /dev/nbd0) == $((262144 * 512)) ]] || fail "/dev/nbd0 has the wrong size"
count=$(open_count k0)
((count == 2)) || fail "2 NBD connections show open count $count"
mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs.ext4 on /dev/nbd0"
mount /dev/nbd0 "$MNT" || fail "mount /dev/nbd0"
for i in 1 2 3; do head -c $((i * 1500000)) /dev/urandom >"$MNT/f$i"; done
sync
(cd "$MNT" && sha256sum f1 f2 f3) >"$WORK/sums"
expect_fail 1 "busy" "$U" remove k0
ok "nbd-client (2 connections) → /dev/nbd0 → ext4; remove refused while connected"

# The table is swapped under the mounted filesystem, over the same file.
head -c 2000000 /dev/urandom >"$MNT/during" &
writer=$!
"$U" suspend k0
"$U" load k0 --table "0 262144 linear $WORK/disk.img 0"
"$U" resume k0
wait "$writer" || fail "a write across suspend/reload/resume failed"
sync
(cd "$MNT" && sha256sum during) >>"$WORK/sums"
umount "$MNT"
echo 3 >/proc/sys/vm/drop_caches
mount /dev/nbd0 "$MNT"
(cd "$MNT" && sha256sum -c --quiet "$WORK/sums") || fail "files differ after the reload"
umount "$MNT"
ok "files read back across suspend/load/resume"

# A second export, added while the device runs, read by a second kernel client.
addr=$("$U" export k0 nbd:tcp:127.0.0.1:0) || fail "userdm export k0"
port=${addr##*:}
nbd-client -N k0 127.0.0.1 "$port" /dev/nbd1 || fail "nbd-client to the added export ($addr)"
cmp /dev/nbd0 /dev/nbd1 || fail "the two exports disagree"
e2fsck -fn /dev/nbd1 >/dev/null || fail "e2fsck through the added export"
nbd-client -d /dev/nbd1
nbd-client -d /dev/nbd0
for ((i = 0; i < 100; i++)); do [[ $(open_count k0) == 0 ]] && break; sleep 0.1; done
[[ $(open_count k0) == 0 ]] || fail "open count $(open_count k0) after the clients left"
"$U" remove k0
ok "an export added with 'userdm export' serves the same data; disconnects close the device"
echo PASS
