#!/bin/bash
# ublk: deleting a device never hangs: an open or mounted device is reported busy (TRY_STOP_DEV
# on 7.0+, a holder scan before); a forced delete under fio completes, fio sees errors, and the
# server exits by itself.
. "$(dirname "$0")/ublk-lib.sh"
need_ext4

start_server busy --backend memory --size 64M -q 2
mkfs.ext4 -q -F "$DEV"
mkdir -p "$WORK/mnt"
mount "$DEV" "$WORK/mnt"
err=$(timeout 20 "$UBLK_SERVE" --delete "$ID" 2>&1) && fail "deleted a mounted device"
echo "$err"
grep -q "is busy" <<<"$err" || fail "unclear busy error: $err"
ok "mounted device reported busy"
# The server's own safe stop (UblkHandle::try_stop) refuses too, and keeps serving.
kill -USR2 "$SERVER_PID"
for ((i = 0; i < 100; i++)); do grep -q "not stopping" "$WORK/busy.log" && break; sleep 0.1; done
grep "not stopping" "$WORK/busy.log" || fail "try_stop did not report busy"
kill -0 "$SERVER_PID" || fail "server exited on a refused stop"
ls "$WORK/mnt" >/dev/null || fail "filesystem unusable after a refused stop"
umount "$WORK/mnt"

fio --name=bg --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
	--size=32M --iodepth=8 --time_based --runtime=60 --output="$WORK/fio-bg.txt" &
fio_pid=$!
wait_io "$DEV"
kill -0 $fio_pid 2>/dev/null || { cat "$WORK/fio-bg.txt"; fail "fio ended early"; }
err=$(timeout 20 "$UBLK_SERVE" --delete "$ID" 2>&1) && fail "deleted a device open by fio"
echo "$err"
grep -q "is busy" <<<"$err" || fail "unclear busy error: $err"
ok "device open by fio reported busy"
start=$(date +%s)
timeout 30 "$UBLK_SERVE" --delete "$ID" --force || fail "forced delete failed or hung"
echo "forced delete took $(($(date +%s) - start))s"
rc=0
timeout 30 tail --pid=$fio_pid -f /dev/null || fail "fio hung after the delete"
wait $fio_pid || rc=$?
[[ $rc -ne 0 ]] || fail "fio saw no error although its device was deleted"
timeout 30 tail --pid="$SERVER_PID" -f /dev/null || fail "server did not exit after the delete"
wait "$SERVER_PID" || fail "server exited with an error after an outside delete"
[[ ! -e $DEV && ! -e /dev/ublkc$ID ]] || fail "device nodes remain"
ok "forced delete under IO: fio failed (rc $rc), server exited, nodes gone"

start_server idle --backend memory --size 16M
kill -USR2 "$SERVER_PID"
wait "$SERVER_PID" || fail "safe stop of an idle device failed: $(cat "$WORK/idle.log")"
grep "stopped (busy check" "$WORK/idle.log"
[[ ! -e $DEV && ! -e /dev/ublkc$ID ]] || fail "safe stop left device nodes"
ok "safe stop of an unused device"
echo PASS
