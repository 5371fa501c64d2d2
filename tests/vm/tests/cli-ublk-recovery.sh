#!/bin/bash
# userdm CLI over ublk: kill -9 of a server with recovery under fio leaves the device QUIESCED;
# `userdm recover` brings it back and fio's verify passes; without recovery the device goes.
# vm-timeout: 600
. "$USERDM_REPO/tests/vm/lib/cli-lib.sh"

state_of() { # ID: the state field of `userdm list`
	"$U" list -n "$1" | awk '/daemon pid/ { print $11 }'
}

truncate -s 64M "$WORK/disk.img"
"$U" add -t loop -f "$WORK/disk.img" -n 3 -q 2 --recovery >"$WORK/add.txt" || fail "add --recovery"
pid=$(awk '/daemon pid/ { print $7 }' "$WORK/add.txt")
dev=/dev/ublkb3
[[ -b $dev ]] || udev_settle "$dev"
fio --name=recover --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--size=32M --iodepth=32 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0 \
	--output="$WORK/fio-recover.txt" &
fio_pid=$!
wait_io "$dev"
kill -KILL "$pid"
for ((i = 0; i < 100; i++)); do
	[[ $(state_of 3) == QUIESCED ]] && break
	sleep 0.1
done
[[ $(state_of 3) == QUIESCED ]] || fail "after kill -9 the device is $(state_of 3), not QUIESCED"
kill -0 "$fio_pid" || fail "fio ended while the device was quiesced"
ok "kill -9 of server $pid under fio: device 3 QUIESCED, fio waiting"
"$U" recover -n 3 >"$WORK/recover.txt" || fail "recover -n 3"
[[ $(state_of 3) == LIVE ]] || fail "after recover the device is $(state_of 3)"
wait "$fio_pid" || { cat "$WORK/fio-recover.txt"; fail "fio failed across the recovery"; }
grep -q "err= 0" "$WORK/fio-recover.txt" || { cat "$WORK/fio-recover.txt"; fail "fio saw errors"; }
"$U" table ublk3 | grep -q "linear" || fail "the recovered device lost its table"
ok "recover -n 3: LIVE again, fio verify passed"
expect_fail 1 "LIVE|not waiting" "$U" recover -n 3
"$U" del -n 3
[[ ! -e $dev ]] || fail "del -n 3 left $dev"
[[ ! -e $USERDM_RUN_DIR/recovery/3.json ]] || fail "the recovery record outlived the device"

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
