#!/bin/bash
# dm-user's character device through CUSE (USERDM_DMUSER_CUSE=1): /dev/dm-user/CTL, opened by
# the unmodified C daemon; a WRITE read byte for byte off the device with head; dd round trip
# and fio verify=crc32c over ublk; kill -9 of the daemon under fio and a new one; removal.
# vm-timeout: 600
. "$USERDM_REPO/tests/vm/lib/cli-lib.sh"
[[ -c /dev/cuse ]] || load_module cuse optional
[[ -c /dev/cuse ]] || skip "no /dev/cuse in this kernel"
command -v cc >/dev/null || skip "no C compiler on the host"
cc -std=c11 -O2 -pthread -o "$WORK/c_daemon" "$REPO/crates/userdm-dmuser-daemon/examples/c/mem_daemon.c" ||
	fail "the C daemon does not build"
export USERDM_DMUSER_CUSE=1
unset USERDM_DMUSER_DIR
size=$((64 << 20))
sectors=$((size / 512))
truncate -s "$size" "$WORK/cu.img"
# A ublk device reads its first and last sectors when it starts (the partition scan), before
# create returns and so before any daemon can connect: those sectors are memory rows.
user=$((sectors - 4096))
dev=$("$U" create cu --table "0 2048 memory
2048 $user user 0 $user cu
$((sectors - 2048)) 2048 memory")
node=/dev/dm-user/cu
[[ -c $node ]] || fail "no character device $node: $(ls -l /dev/dm-user)"
[[ -S $node.sock ]] || fail "the socket did not move to $node.sock"
ok "$node is a character device ($(stat -c '%t:%T %a' "$node")); the socket is $node.sock"

# No daemon yet: a WRITE waits; head takes its message off the device byte for byte, and its
# close puts the request back for the next reader.
head -c 4096 /dev/urandom >"$WORK/block"
dd if="$WORK/block" of="$dev" bs=4096 count=1 seek=600 oflag=direct conv=notrunc 2>/dev/null &
writer=$!
head -c $((40 + 4096)) "$node" >"$WORK/msg" || fail "head on $node"
# (Files, not <(...): the guest's /dev has no /dev/fd.)
od -An -t u8 -N 40 -w40 "$WORK/msg" >"$WORK/fields"
read -r seq type flags sector len <"$WORK/fields"
echo "message: seq=$seq type=$type flags=$flags sector=$sector len=$len"
# Block 8 of the device is sector 64; the user row starts at sector 2048 and dm-user's sectors
# are the device's, so the write goes to block 600 (sector 4800).
[[ $type == 1 && $sector == 4800 && $len == 4096 ]] || fail "not the WRITE of sector 4800, 4096 bytes"
tail -c 4096 "$WORK/msg" | cmp - "$WORK/block" || fail "the WRITE's payload is not the data written"
kill -0 "$writer" || fail "the write finished with no daemon"
"$WORK/c_daemon" "$node" "$WORK/cu.img" 2 >"$WORK/d1.log" 2>&1 &
daemon=$!
wait "$writer" || fail "the write failed after the daemon started"
# The daemon's file holds the row from sector 0 of its own: its offset is the device's
# sector less nothing (dm-user daemons see device sectors), so block 600 again.
dd if="$WORK/cu.img" of="$WORK/back" bs=4096 skip=600 count=1 2>/dev/null
cmp "$WORK/back" "$WORK/block" ||
	fail "the daemon's file does not hold the block"
ok "head read a WRITE byte-exact off $node; its close re-queued it to the daemon"

head -c $((8 << 20)) /dev/urandom >"$WORK/data"
dd if="$WORK/data" of="$dev" bs=1M seek=2 oflag=direct 2>/dev/null || fail "dd to $dev"
dd if="$dev" of="$WORK/data.back" bs=1M skip=2 count=8 iflag=direct 2>/dev/null
cmp "$WORK/data.back" "$WORK/data" || fail "dd round trip differs"
ok "dd round trip through the C daemon on $node"

fio --name=cuse --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--offset=2M --size=32M --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
	--verify_state_save=0 --output="$WORK/fio-cuse.txt" &
fio_pid=$!
wait_io "$dev"
kill -KILL "$daemon"
wait "$daemon" 2>/dev/null || true
"$WORK/c_daemon" "$node" "$WORK/cu.img" 2 >"$WORK/d2.log" 2>&1 &
daemon=$!
wait "$fio_pid" || { cat "$WORK/fio-cuse.txt"; fail "fio failed across the daemon's death"; }
grep -q "err= 0" "$WORK/fio-cuse.txt" || { cat "$WORK/fio-cuse.txt"; fail "fio saw errors"; }
"$U" status cu
ok "kill -9 of the daemon under fio, a new daemon: fio verify passed"

"$U" remove cu || fail "remove cu"
for ((i = 0; i < 100; i++)); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
kill -0 "$daemon" 2>/dev/null && fail "the daemon did not end after the removal"
grep -q "ENOTBLK\|not a block device\|removed" "$WORK/d2.log" || cat "$WORK/d2.log"
[[ ! -e $node ]] || fail "$node outlived the device"
ok "removal ended the daemon and took $node away"
echo PASS
