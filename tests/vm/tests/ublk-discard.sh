#!/bin/bash
# ublk: DISCARD and WRITE_ZEROES (blkdiscard, blkdiscard -z) read back as zeros, and the
# advertised limits reach the queue.
. "$(dirname "$0")/ublk-lib.sh"

check_zeros() { # DEV OFFSET LEN WHAT
	local n
	n=$(dd if="$1" bs=1M skip=$(($2 >> 20)) count=$(($3 >> 20)) iflag=direct status=none | tr -d '\0' | wc -c)
	[[ $n -eq 0 ]] || fail "$4: $n non-zero bytes after it"
}

for backend in memory file; do
	if [[ $backend == file ]]; then
		truncate -s 64M "$WORK/disk.img"
		start_server $backend --backend file --file "$WORK/disk.img"
	else
		start_server $backend --backend memory --size 64M
	fi
	q=/sys/block/ublkb$ID/queue
	echo "discard_max_bytes $(cat $q/discard_max_bytes) write_zeroes_max_bytes $(cat $q/write_zeroes_max_bytes) granularity $(cat $q/discard_granularity)"
	[[ $(cat $q/discard_max_bytes) -gt 0 ]] || fail "no discard advertised"
	[[ $(cat $q/write_zeroes_max_bytes) -gt 0 ]] || fail "no write zeroes advertised"
	head -c $((16 << 20)) /dev/urandom | dd of="$DEV" bs=1M oflag=direct status=none
	blkdiscard -o $((4 << 20)) -l $((4 << 20)) "$DEV" || fail "blkdiscard"
	check_zeros "$DEV" $((4 << 20)) $((4 << 20)) "$backend discard"
	blkdiscard -z -o $((9 << 20)) -l $((3 << 20)) "$DEV" || fail "blkdiscard -z"
	check_zeros "$DEV" $((9 << 20)) $((3 << 20)) "$backend write zeroes"
	n=$(dd if="$DEV" bs=1M count=4 iflag=direct status=none | tr -d '\0' | wc -c)
	[[ $n -gt 0 ]] || fail "$backend: data outside the discarded range was lost"
	stop_server "$SERVER_PID" $backend
	ok "$backend: discard and write zeroes read back as zeros"
done
echo PASS
