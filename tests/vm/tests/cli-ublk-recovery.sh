#!/bin/bash
# userdm CLI over ublk: kill -9 of a server with recovery under fio leaves the device QUIESCED;
# `userdm recover` brings it back and fio's verify passes, for a loop row and for a memory row
# (whose bytes live in the run directory); without recovery the device goes.
# vm-timeout: 600
. "$USERDM_REPO/tests/vm/lib/cli-lib.sh"

state_of() { # ID: the state field of `userdm list`
	"$U" list -n "$1" | awk '/daemon pid/ { print $11 }'
}

# kill_and_recover ID: fio writes with verify on /dev/ublkbID; its server is killed with -9
# mid-run; `recover` brings the device back and fio's verify of every block passes.
kill_and_recover() {
	local id=$1 dev=/dev/ublkb$1 pid fio_pid
	pid=$(awk '/daemon pid/ { print $7 }' "$WORK/add$id.txt")
	[[ -b $dev ]] || udev_settle "$dev"
	fio --name=recover --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
		--size=32M --iodepth=32 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0 \
		--output="$WORK/fio-recover$id.txt" &
	fio_pid=$!
	wait_io "$dev"
	kill -KILL "$pid"
	for ((i = 0; i < 100; i++)); do
		[[ $(state_of "$id") == QUIESCED ]] && break
		sleep 0.1
	done
	[[ $(state_of "$id") == QUIESCED ]] || fail "after kill -9 device $id is $(state_of "$id"), not QUIESCED"
	kill -0 "$fio_pid" || fail "fio ended while device $id was quiesced"
	ok "kill -9 of server $pid under fio: device $id QUIESCED, fio waiting"
	"$U" recover -n "$id" >"$WORK/recover$id.txt" || fail "recover -n $id"
	[[ $(state_of "$id") == LIVE ]] || fail "after recover device $id is $(state_of "$id")"
	wait "$fio_pid" || { cat "$WORK/fio-recover$id.txt"; fail "fio failed across the recovery of $id"; }
	grep -q "err= 0" "$WORK/fio-recover$id.txt" || { cat "$WORK/fio-recover$id.txt"; fail "fio saw errors on $id"; }
	ok "recover -n $id: LIVE again, fio verify passed"
}

truncate -s 64M "$WORK/disk.img"
"$U" add -t loop -f "$WORK/disk.img" -n 3 -q 2 --recovery >"$WORK/add3.txt" || fail "add --recovery"
kill_and_recover 3
"$U" table ublk3 | grep -q "linear" || fail "the recovered device lost its table"
expect_fail 1 "LIVE|not waiting" "$U" recover -n 3
"$U" del -n 3
[[ ! -e /dev/ublkb3 ]] || fail "del -n 3 left /dev/ublkb3"
[[ ! -e $USERDM_RUN_DIR/recovery/3.json ]] || fail "the recovery record outlived the device"

# A RAM disk with recovery: its bytes live in the run directory, so they outlive the server.
"$U" add -t memory --size 64M -n 5 -q 2 --recovery >"$WORK/add5.txt" || fail "add -t memory --recovery"
kill_and_recover 5
ls "$USERDM_RUN_DIR"/memory/*/*.mem >/dev/null 2>&1 || fail "no storage file under $USERDM_RUN_DIR/memory"
# A second kill with no IO in flight: the bytes read back after the recovery are the same.
sum=$(dd if=/dev/ublkb5 bs=1M iflag=direct status=none | md5sum)
pid=$("$U" list -n 5 | awk '/daemon pid/ { print $7 }')
kill -KILL "$pid"
for ((i = 0; i < 100; i++)); do
	[[ $(state_of 5) == QUIESCED ]] && break
	sleep 0.1
done
[[ $(state_of 5) == QUIESCED ]] || fail "after the second kill -9 device 5 is $(state_of 5)"
"$U" recover -n 5 >/dev/null || fail "second recover -n 5"
[[ $(dd if=/dev/ublkb5 bs=1M iflag=direct status=none | md5sum) == "$sum" ]] ||
	fail "a memory row lost bytes across a recovery"
ok "memory row: contents identical across a kill -9 and recover"
"$U" del -n 5
[[ ! -e /dev/ublkb5 ]] || fail "del -n 5 left /dev/ublkb5"
if compgen -G "$USERDM_RUN_DIR/memory/*/*" >/dev/null; then
	fail "the memory row's storage outlived the device: $(ls -R "$USERDM_RUN_DIR/memory")"
fi
ok "del -n 5 took the memory row's storage with it"

# Without recovery the device goes with its server.
"$U" add -t memory --size 16M -n 4 >"$WORK/add4.txt" || fail "add -n 4"
pid=$(awk '/daemon pid/ { print $7 }' "$WORK/add4.txt")
kill -KILL "$pid"
for ((i = 0; i < 100; i++)); do
	[[ -e /dev/ublkb4 ]] || break
	sleep 0.1
done
if [[ -e /dev/ublkb4 ]]; then
	# The kernel keeps a DEAD device until someone deletes it; del does, without a server.
	expect_fail 1 "recovery" "$U" recover -n 4
	"$U" del -n 4
fi
[[ ! -e /dev/ublkb4 ]] || fail "a device without recovery outlived its server and del"
ok "without recovery: the device did not outlive its server"
echo PASS
