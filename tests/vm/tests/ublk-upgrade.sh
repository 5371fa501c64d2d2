#!/bin/bash
# ublk: live upgrade with QUIESCE_DEV (6.16+): the server quiesces its device and exits cleanly
# under fio, a new server recovers it, and fio finishes with verify passing.
. "$(dirname "$0")/ublk-lib.sh"
kernel_at_least 6 16 || skip "QUIESCE_DEV needs Linux 6.16 (this is $(uname -r))"

truncate -s 64M "$WORK/disk.img"
start_server old --backend file --file "$WORK/disk.img" -q 2 -d 64 --recovery
fio --name=upgrade --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--size=32M --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
	--output="$WORK/fio-upgrade.txt" &
fio_pid=$!
wait_io "$DEV"
kill -HUP "$SERVER_PID"
wait "$SERVER_PID" || { cat "$WORK/old.log"; fail "the old server did not exit cleanly"; }
grep "quiescing" "$WORK/old.log"
state=$("$UBLK_SERVE" --list | awk -v id="$ID" '$2 == id { print $10 }')
[[ $state == QUIESCED ]] || fail "after quiesce the device is '$state'"
kill -0 $fio_pid 2>/dev/null || fail "fio ended while the device was quiesced"
ok "old server quiesced device $ID and exited"
start_server new --recover "$ID" --backend file --file "$WORK/disk.img"
wait $fio_pid || { cat "$WORK/fio-upgrade.txt"; fail "fio failed across the upgrade"; }
grep -q "err= 0" "$WORK/fio-upgrade.txt" || { cat "$WORK/fio-upgrade.txt"; fail "fio errors"; }
ok "new server took over; fio verify passed"
stop_server "$SERVER_PID" new
echo PASS
