#!/bin/bash
# ublk benchmark (not a test): userdm vs rublk vs null_blk vs loop, run by bench/ublk/run.
# Skips unless bench/ublk/run left a fresh request file; writes $VM_OUT/ublk-bench.csv.
set -euo pipefail
REQUEST=/var/cache/userdm-bench/request
# Only the VM that bench/ublk/run boots runs this: it passes USERDM_BIN=$MARKER (the one
# variable the harness carries into the guest), so other test runs skip at once even while a
# benchmark's request file exists.
MARKER=/var/cache/userdm-bench/bin/userdm
if [[ ${USERDM_BIN:-} != "$MARKER" || ! -f $REQUEST ]]; then
	echo "benchmark only: run bench/ublk/run"
	exit 77
fi
# shellcheck source=/dev/null
. "$REQUEST" # RUBLK REPS RUNTIME SIZE_MB DEVICES WORKLOADS
. "$(dirname "$0")/ublk-lib.sh"
CSV=$VM_OUT/ublk-bench.csv
echo "device,queues,workload,rep,iops,bw_kib,lat_mean_us" >"$CSV"
uname -r >"$VM_OUT/ublk-bench.kernel"
nproc >"$VM_OUT/ublk-bench.cpus"

declare -A DEVS
# The benchmark's own cleanup runs first, then the library's.
bench_cleanup() {
	set +e
	[[ -n ${RUBLK:-} && -x ${RUBLK:-} ]] && "$RUBLK" del -a >/dev/null 2>&1
	for d in /sys/kernel/config/nullb/nullbq*; do
		[[ -d $d ]] || continue
		echo 0 >"$d/power"
		rmdir "$d"
	done
	losetup -D 2>/dev/null
	cleanup
}
trap bench_cleanup EXIT

wait_node() {
	local i
	for ((i = 0; i < 300; i++)); do
		[[ -b $1 ]] && return 0
		sleep 0.1
	done
	fail "$1 did not appear"
}

setup() { # NAME QUEUES
	local name=$1 q=$2 id
	case $name in
	userdm | userdm-uc | userdm+* | userdm-uc+*)
		# Variants, for experiments: +nospin (USERDM_SPIN_US=0), +nodefer (USERDM_URING_DEFER=0).
		local extra=()
		[[ ${name%%+*} == userdm-uc ]] && extra=(--user-copy)
		[[ $name == *+nospin* ]] && local -x USERDM_SPIN_US=0
		[[ $name == *+nodefer* ]] && local -x USERDM_URING_DEFER=0
		start_server "$name-q$q" --backend null --size "${SIZE_MB}M" -q "$q" -d 128 "${extra[@]}"
		DEVS[$name-q$q]=$DEV
		;;
	rublk | rublk-uc | rublk-zc)
		id=$((100 + ${#DEVS[@]}))
		local extra=()
		[[ $name == rublk-uc ]] && extra=(-u)
		[[ $name == rublk-zc ]] && extra=(-z)
		"$RUBLK" add null -n "$id" -q "$q" -d 128 "${extra[@]}" >"$WORK/$name-q$q.log" 2>&1 ||
			fail "rublk add: $(cat "$WORK/$name-q$q.log")"
		wait_node "/dev/ublkb$id"
		DEVS[$name-q$q]=/dev/ublkb$id
		;;
	null_blk)
		local d=/sys/kernel/config/nullb/nullbq$q
		mkdir "$d"
		echo "$SIZE_MB" >"$d/size"
		echo "$q" >"$d/submit_queues"
		echo 128 >"$d/hw_queue_depth"
		echo 1 >"$d/power"
		# Since 5.x the disk is named after the configfs directory; before, nullb<index>.
		DEVS[$name-q$q]=/dev/nullbq$q
		[[ -b ${DEVS[$name-q$q]} ]] || DEVS[$name-q$q]=/dev/nullb$(cat "$d/index")
		wait_node "${DEVS[$name-q$q]}"
		;;
	loop)
		truncate -s "${SIZE_MB}M" "$WORK/loop.img"
		DEVS[$name-q$q]=$(losetup --direct-io=on -f --show "$WORK/loop.img")
		echo "loop dio: $(cat "/sys/block/${DEVS[$name-q$q]#/dev/}/loop/dio")"
		;;
	*) fail "unknown device kind $name" ;;
	esac
	echo "device $name-q$q: ${DEVS[$name-q$q]}"
}

workload_args() { # NAME
	case $1 in
	randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1 --numjobs=1" ;;
	randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --numjobs=1" ;;
	randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=16 --numjobs=2" ;;
	randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=16 --numjobs=2" ;;
	read-128k-qd8) echo "--rw=read --bs=128k --iodepth=8 --numjobs=1" ;;
	write-128k-qd8) echo "--rw=write --bs=128k --iodepth=8 --numjobs=1" ;;
	*) fail "unknown workload $1" ;;
	esac
}

for spec in $DEVICES; do
	setup "${spec%:*}" "${spec#*:}"
done
# Every other repetition runs the devices in reverse order, so that whatever the position in a
# round costs or gives (the machine's load drifts within a round) falls on all devices alike.
reversed=$(echo $DEVICES | tr ' ' '\n' | tac | tr '\n' ' ')
for ((rep = 1; rep <= REPS; rep++)); do
	order=$DEVICES
	((rep % 2)) || order=$reversed
	for w in $WORKLOADS; do
		for spec in $order; do
			key=${spec%:*}-q${spec#*:}
			# shellcheck disable=SC2046 # the workload's options split on purpose
			fio --name=b --filename="${DEVS[$key]}" --ioengine=io_uring --direct=1 \
				--time_based --runtime="$RUNTIME" --ramp_time=1 --size="${SIZE_MB}M" \
				--group_reporting --output-format=json --output="$WORK/r.json" \
				$(workload_args "$w") || fail "fio $key $w"
			python3 - "$WORK/r.json" "$key" "${spec#*:}" "$w" "$rep" >>"$CSV" <<'PY'
import json, sys
path, key, q, w, rep = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
name = key.rsplit("-q", 1)[0]
print(f"{name},{q},{w},{rep},{side['iops']:.0f},{side['bw']},{side['lat_ns']['mean'] / 1000:.1f}")
PY
			tail -n1 "$CSV"
		done
	done
done
echo PASS
