#!/bin/bash
# userdm CLI over ublk: create serves /dev/ublkbN by default, ext4 + checksums, fio verify,
# busy/deferred/force remove, rename, reload under fio, add/list/del, bad input.
# vm-timeout: 900
. "$USERDM_REPO/tests/vm/lib/cli-lib.sh"
need_ext4

# --- create: ublk by default, the path on stdout, /dev/userdm/NAME, real device numbers
dev=$("$U" create m0 --table "0 262144 memory")
[[ $dev == /dev/ublkb* ]] || fail "create printed '$dev', not a /dev/ublkbN path"
[[ -b $dev ]] || udev_settle "$dev"
[[ $(readlink /dev/userdm/m0) == "$dev" ]] || fail "/dev/userdm/m0 is not a link to $dev"
want=$(printf '%d, %d' "0x$(stat -c %t "$dev")" "0x$(stat -c %T "$dev")")
"$U" info m0 | grep -q "^Major, minor: *$want\$" ||
	fail "info does not show $dev's numbers ($want): $("$U" info m0)"
[[ $(blockdev --getsize64 "$dev") == $((262144 * 512)) ]] || fail "$dev has the wrong size"
"$U" info --json m0 | grep -q "\"block_device\": \"$dev\"" || fail "info --json has no block_device"
ok "create m0: $dev ($want), /dev/userdm/m0"

# --- ext4, files with checksums, across a remount
mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 on $dev"
mount "$dev" "$MNT" || fail "mount $dev"
for i in 1 2 3; do head -c $((i * 1500000)) /dev/urandom >"$MNT/f$i"; done
(cd "$MNT" && sha256sum f1 f2 f3) >"$WORK/sums"
count=$(open_count m0)
((count >= 1)) || fail "a mounted device shows open count $count"
expect_fail 1 "busy" "$U" remove m0
[[ -b $dev ]] || fail "a refused remove took $dev away"
umount "$MNT"
mount "$dev" "$MNT"
(cd "$MNT" && sha256sum -c --quiet "$WORK/sums") || fail "files changed across a remount"
ok "ext4 on $dev: files read back; open count $count while mounted; remove refused (busy)"

# --- deferred removal: returns at once, the device goes at the last close (the umount)
"$U" remove --deferred m0 || fail "remove --deferred m0"
"$U" info m0 | grep -q "DEFERRED REMOVE" || fail "no deferred remove state: $("$U" info m0)"
[[ -b $dev ]] || fail "the deferred remove took $dev away while mounted"
umount "$MNT"
wait_gone m0
for ((i = 0; i < 50; i++)); do [[ -e $dev ]] || break; sleep 0.1; done
[[ ! -e $dev ]] || fail "$dev is still there after the deferred removal"
[[ ! -e /dev/userdm/m0 ]] || fail "/dev/userdm/m0 is still there"
ok "remove --deferred: the device went at umount"

# --- fio verify: 2 queues of depth 128, kernel copy and user copy
for mode in "" ",user-copy"; do
	dev=$("$U" create v0 --table "0 131072 memory" --export "ublk:queues=2,depth=128$mode")
	"$U" list | grep -A1 "^dev id ${dev#/dev/ublkb}:" | grep -q "nr_hw_queues 2 queue_depth 128" ||
		fail "not 2 queues of depth 128: $("$U" list)"
	verify_fio "v0$mode" "$dev"
	"$U" remove v0
	ok "fio verify=crc32c over 2 queues x 128${mode:+ with user copy}"
done

# --- rename moves the link; reloads under fio lose nothing
truncate -s 64M "$WORK/a.img" "$WORK/b.img"
dev=$("$U" create r0 --table "0 131072 linear $WORK/a.img 0")
"$U" rename r0 r1
[[ ! -e /dev/userdm/r0 && $(readlink /dev/userdm/r1) == "$dev" ]] || fail "rename did not move the link"
fio --name=reload --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--size=48M --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0 \
	--output="$WORK/fio-reload.txt" &
fio_pid=$!
wait_io "$dev"
for i in 1 2 3 4 5; do
	"$U" suspend r1
	"$U" load r1 --table "0 131072 linear $WORK/a.img 0"
	"$U" resume r1
	sleep 0.3
done
wait "$fio_pid" || { cat "$WORK/fio-reload.txt"; fail "fio under reloads failed"; }
grep -q "err= 0" "$WORK/fio-reload.txt" || { cat "$WORK/fio-reload.txt"; fail "fio under reloads saw errors"; }
ok "5 suspend/load/resume cycles under fio verify: no errors"

# --- a bigger table: grows the device where the kernel has UPDATE_SIZE (6.16+)
"$U" load r1 --table "0 262144 striped 2 128 $WORK/a.img 0 $WORK/b.img 0"
"$U" resume r1 2>"$WORK/err" || fail "resume to a bigger table: $(cat "$WORK/err")"
size=$(blockdev --getsize64 "$dev")
if kernel_at_least 6 16; then
	[[ $size == $((262144 * 512)) ]] || fail "$dev did not grow: $size bytes"
	ok "resume to a bigger table grew $dev to $size bytes"
else
	grep -q "keeps its old size" "$WORK/err" || fail "no warning that $dev cannot grow: $(cat "$WORK/err")"
	ok "resume to a bigger table on $(uname -r): warned ($(cat "$WORK/err"))"
fi

# --- remove --force of an open device: its IO fails from then on, it stays while open
exec 7<"$dev"
expect_fail 1 "busy" "$U" remove --force r1
"$U" table r1 | grep -q " error" || fail "remove --force did not load an error table"
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null && fail "IO succeeded after remove --force"
exec 7<&-
"$U" remove r1
wait_gone r1
ok "remove --force: error table while open, removed once closed"

# --- ublksrv verbs
truncate -s 32M "$WORK/loop.img"
"$U" add -t loop -f "$WORK/loop.img" -n 7 -q 2 >"$WORK/add.txt" || fail "add -t loop"
cat "$WORK/add.txt"
grep -q "^dev id 7: nr_hw_queues 2" "$WORK/add.txt" || fail "add printed no dev id 7 line"
[[ $(awk '/daemon pid/ { print $11 }' "$WORK/add.txt") == LIVE ]] || fail "state is not field 11"
pid=$(awk '/daemon pid/ { print $7 }' "$WORK/add.txt")
kill -0 "$pid" || fail "pid field 7 ($pid) is not a live process"
"$U" table ublk7 | grep -q "^0 65536 linear " || fail "add -t loop made no linear row: $("$U" table ublk7)"
verify_fio loop7 /dev/ublkb7
"$U" add -t null --size 1G --name nul >/dev/null || fail "add -t null"
id=$("$U" list --json | python3 -c 'import json,sys; print([d["id"] for d in json.load(sys.stdin) if d["name"] == "nul"][0])')
fio_run null "--filename=/dev/ublkb$id" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
	--size=1G --iodepth=16 --time_based --runtime=2
"$U" add -t memory --size 16M -n 9 >/dev/null || fail "add -t memory"
"$U" list | grep -c "^dev id" | grep -qx 3 || fail "list does not show 3 devices: $("$U" list)"
"$U" features | grep -q "UBLK_F_USER_COPY" || fail "features does not name UBLK_F_USER_COPY"
"$U" del -n 7
[[ ! -e /dev/ublkb7 ]] || fail "del -n 7 left /dev/ublkb7"
"$U" del -a
[[ $("$U" list) == "" ]] || fail "del -a left: $("$U" list)"
ok "add -t loop|null|memory, list (ublksrv fields), features, del -n, del -a"

# --- bad input: each a clear error and a non-zero exit, nothing left behind
expect_fail 2 "unknown ublk option" "$U" create e0 --table "0 8 zero" --export ublk:bogus
expect_fail 2 "unexpected argument" "$U" add -t null --frobnicate
expect_fail 1 "missing.img" "$U" add -t loop -f "$WORK/missing.img"
expect_fail 1 "no such file" "$U" create e1 --table "0 8 linear $WORK/missing.img 0"
USERDM_UBLK_CONTROL=/nonexistent expect_fail 1 "modprobe ublk_drv" "$U" create e2 --table "0 8 zero" --export ublk
if ! kernel_at_least 6 16; then
	expect_fail 1 "zero.copy|AUTO_BUF_REG" "$U" create e3 --table "0 8 zero" --export ublk:zero-copy
fi
[[ $("$U" ls) == "No devices found" ]] || fail "failed commands left devices: $("$U" ls)"
ok "bad input refused"
echo PASS
