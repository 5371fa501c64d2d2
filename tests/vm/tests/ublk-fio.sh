#!/bin/bash
# ublk: fio verify=crc32c random write/read in every data mode (copy, need-get-data, user copy,
# zero copy where the kernel has it), 2 queues of depth 128, memory and file backends.
. "$(dirname "$0")/ublk-lib.sh"

verify() { # NAME DEV
	fio_run "$1" --filename="$2" --ioengine=io_uring --direct=1 --rw=randwrite \
		--bsrange=4k-128k --size=24M --iodepth=32 --numjobs=1 --verify=crc32c \
		--verify_fatal=1 --do_verify=1 --randrepeat=0
}

modes=("" --need-get-data --user-copy)
if kernel_at_least 6 16; then modes+=(--zero-copy); fi
for mode in "${modes[@]}"; do
	name=mem${mode:-copy}
	start_server "$name" --backend memory --size 64M -q 2 -d 128 $mode
	"$UBLK_SERVE" --list | grep "^dev $ID " | grep -q "queues 2 depth 128" ||
		fail "device $ID is not 2 queues of depth 128: $("$UBLK_SERVE" --list)"
	verify "$name" "$DEV"
	stop_server "$SERVER_PID" "$name"
	ok "memory backend, mode ${mode:-copy}: fio verify passed"
done

truncate -s 64M "$WORK/disk.img"
start_server file --backend file --file "$WORK/disk.img" -q 2 -d 64 --user-copy
verify file "$DEV"
stop_server "$SERVER_PID" file
ok "file backend with user copy: fio verify passed"

if kernel_at_least 6 16; then
	# Zero copy for real: the file backend names where each request's data lives, so READ and
	# WRITE move by fixed-buffer IO between the file and the request's pages.
	start_server filezc --backend file --file "$WORK/disk.img" -q 2 -d 64 --zero-copy
	verify filezc "$DEV"
	stop_server "$SERVER_PID" filezc
	grep "served" "$WORK/filezc.log"
	direct=$(sed -n 's/.* \([0-9]*\) by zero copy.*/\1/p' "$WORK/filezc.log")
	((direct > 100)) || fail "only ${direct:-0} requests went by zero copy"
	ok "file backend with zero copy: fio verify passed, $direct requests by zero copy"
fi
# Steady-state IO allocates nothing: the null backend allocates nothing itself, so every
# allocation the process makes while serving is the frontend's.
start_server null --backend null --size 1G -q 2 -d 64
fio_run null --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
	--size=1G --iodepth=32 --numjobs=2 --time_based --runtime=5 --group_reporting
stop_server "$SERVER_PID" null
allocs=$(sed -n 's/.*allocations while serving: //p' "$WORK/null.log")
served=$(sed -n 's/.*served \([0-9]*\) requests.*/\1/p' "$WORK/null.log")
echo "served $served requests with $allocs heap allocations"
((served > 2000)) || fail "only $served requests served"
((allocs < 16)) || fail "$allocs allocations while serving $served requests"
ok "no allocation per request ($allocs allocations for $served requests)"
echo PASS
