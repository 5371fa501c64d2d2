#!/bin/bash
# ublk: with --recovery, kill -9 of the server under fio leaves the device QUIESCED; a new
# server recovers it and fio finishes with verify passing. Without recovery the dead server's
# device fails IO and can be deleted.
. "$(dirname "$0")/ublk-lib.sh"

truncate -s 64M "$WORK/disk.img"
start_server first --backend file --file "$WORK/disk.img" -q 2 -d 64 --recovery
fio --name=recover --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--size=32M --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
	--output="$WORK/fio-recover.txt" &
fio_pid=$!
wait_io "$DEV"
kill -0 $fio_pid 2>/dev/null || { cat "$WORK/fio-recover.txt"; fail "fio ended before the kill"; }
kill -KILL "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
for ((i = 0; i < 100; i++)); do
	state=$("$UBLK_SERVE" --list | awk -v id="$ID" '$2 == id { print $10 }')
	[[ $state == QUIESCED ]] && break
	sleep 0.1
done
[[ $state == QUIESCED ]] || fail "after kill -9 the device is '$state', not QUIESCED"
ok "server killed under IO; device $ID is QUIESCED"
kill -0 $fio_pid 2>/dev/null || fail "fio ended while the device was quiesced"
start_server second --recover "$ID" --backend file --file "$WORK/disk.img"
[[ $DEV == /dev/ublkb$ID ]] || fail "recovered as $DEV"
ok "recovered device $ID"
wait $fio_pid || { cat "$WORK/fio-recover.txt"; fail "fio failed across the recovery"; }
grep -q "err= 0" "$WORK/fio-recover.txt" || { cat "$WORK/fio-recover.txt"; fail "fio errors"; }
grep -E "IOPS=|err=" "$WORK/fio-recover.txt" | head -n 2
ok "fio finished with verify passing"
stop_server "$SERVER_PID" second

start_server norecovery --backend memory --size 32M
kill -KILL "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
for ((i = 0; i < 100; i++)); do
	[[ -e $DEV ]] || break
	sleep 0.1
done
[[ ! -e $DEV ]] || fail "without recovery the dead server's disk $DEV is still there"
"$UBLK_SERVE" --list | grep "^dev $ID " | grep -q "state DEAD" || fail "device $ID not DEAD: $("$UBLK_SERVE" --list)"
err=$("$UBLK_SERVE" --recover "$ID" --backend memory --size 32M 2>&1) && fail "recovered a device without recovery"
grep -q "cannot be recovered" <<<"$err" || fail "unclear error: $err"
"$UBLK_SERVE" --delete "$ID" || fail "delete of the dead device"
[[ ! -e /dev/ublkc$ID ]] || fail "/dev/ublkc$ID still there"
ok "without recovery: dead server's device is failed and removable"
echo PASS
