# shellcheck shell=bash
# Helpers shared by the ublk-*.sh VM tests; sourced, never run (not executable, so the
# harness does not list it). Provides: the ublk-serve example binary, server start/stop,
# cleanup of every ublk device on exit, and kernel version checks.
set -euo pipefail

fail() {
	echo "FAIL: $*"
	exit 1
}
skip() {
	echo "SKIP: $*"
	exit 77
}
ok() { echo "ok: $*"; }

REPO=${USERDM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)}
UBLK_SERVE=${UBLK_SERVE:-$REPO/target/release/examples/ublk-serve}
[[ -x $UBLK_SERVE ]] || fail "$UBLK_SERVE missing: run 'cargo build --release -p userdm-ublk --examples' on the host first"
[[ -c /dev/ublk-control ]] || skip "no /dev/ublk-control: the kernel has no ublk"

WORK=$(mktemp -d /tmp/ublk-test.XXXXXX)
SERVER_PIDS=()

cleanup() {
	local pid job
	set +e
	# Background jobs other than servers (fio) go first, so no IO holds a device.
	for job in $(jobs -p); do
		[[ " ${SERVER_PIDS[*]} " == *" $job "* ]] || kill -KILL "$job" 2>/dev/null
	done
	for m in $(awk '$1 ~ /^\/dev\/(ublkb|mapper|dm-)/ { print $2 }' /proc/mounts | sort -r); do
		umount -l "$m" 2>/dev/null
	done
	dmsetup remove_all --force >/dev/null 2>&1
	for pid in "${SERVER_PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null
	done
	for pid in "${SERVER_PIDS[@]}"; do
		timeout 10 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -KILL "$pid" 2>/dev/null
	done
	for c in /dev/ublkc*; do
		[[ -e $c ]] || continue
		"$UBLK_SERVE" --delete "${c#/dev/ublkc}" --force >/dev/null 2>&1
	done
	rm -rf "$WORK"
}
trap cleanup EXIT

# load_module NAME [optional]: loads a kernel module (and its dependencies) that the VM's initramfs did
# not, from the unpacked kernel package in the VM cache, with busybox insmod (the host root the
# guest runs on has no kmod). Used for filesystems (ext4) the harness does not load.
load_module() {
	local name=${1//-/_} moddir rel dep ko f
	[[ -d /sys/module/$name ]] && return 0
	moddir=$(ls -d "${USERDM_VM_CACHE:-/var/cache/userdm-vm}"/kernel-*/root/{lib,usr/lib}/modules/"$(uname -r)" 2>/dev/null | head -n1 || true)
	[[ -n $moddir ]] || fail "no modules for $(uname -r) in the VM cache"
	rel=$(awk -v n="$name" '{ m = $0; sub(/.*\//, "", m); sub(/\.ko.*/, "", m); gsub(/-/, "_", m); if (m == n) { print; exit } }' "$moddir/modules.order")
	if [[ -z $rel ]]; then
		grep -q "/${1}.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
		[[ ${2:-} == optional ]] && return 0
		fail "module $1 not found in $moddir"
	fi
	ko=$WORK/$name.ko
	f=$(ls "$moddir/$rel"* | head -n1)
	case $f in
	*.xz) xz -dc "$f" >"$ko" ;;
	*.zst) zstd -qdc "$f" >"$ko" ;;
	*) cp "$f" "$ko" ;;
	esac
	for dep in $(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
		load_module "$dep"
	done
	busybox insmod "$ko" 2>/dev/null || [[ -d /sys/module/$name ]] || fail "insmod $name failed"
}

# need_ext4: ext4 plus the crc32c implementation it asks the crypto API for at mount time
# (on 6.12 a module the kernel would modprobe, which the guest cannot).
need_ext4() {
	load_module ext4
	load_module crc32c_generic optional
	load_module crc32c_intel optional
}

# kernel_at_least MAJOR MINOR
kernel_at_least() {
	local v maj min
	v=$(uname -r)
	maj=${v%%.*}
	min=${v#*.}
	min=${min%%[.-]*}
	((maj > $1 || (maj == $1 && min >= $2)))
}

# start_server NAME ARGS...: starts ublk-serve in the background; sets DEV (the /dev/ublkbN
# path), SERVER_PID and ID; the server's stderr goes to $WORK/NAME.log.
start_server() {
	local name=$1 out i
	shift
	out=$WORK/$name.out
	: >"$out"
	"$UBLK_SERVE" "$@" >"$out" 2>"$WORK/$name.log" &
	SERVER_PID=$!
	SERVER_PIDS+=("$SERVER_PID")
	for ((i = 0; i < 600; i++)); do
		if [[ -s $out ]]; then
			DEV=$(head -n1 "$out")
			ID=${DEV#/dev/ublkb}
			[[ -b $DEV ]] || udev_settle "$DEV"
			echo "server $name (pid $SERVER_PID): $DEV"
			return 0
		fi
		if ! kill -0 "$SERVER_PID" 2>/dev/null; then
			cat "$WORK/$name.log"
			fail "server $name exited before serving"
		fi
		sleep 0.1
	done
	cat "$WORK/$name.log"
	fail "server $name did not print its device within 60s"
}

# The guest has devtmpfs but no udev: the node normally appears at once.
udev_settle() {
	local i
	for ((i = 0; i < 50; i++)); do
		[[ -b $1 ]] && return 0
		sleep 0.1
	done
	fail "$1 did not appear"
}

# stop_server PID NAME: SIGTERM, wait, check it exited 0.
stop_server() {
	local pid=$1 name=$2 rc=0
	kill -TERM "$pid"
	wait "$pid" || rc=$?
	[[ $rc -eq 0 ]] || {
		cat "$WORK/$name.log"
		fail "server $name exited with status $rc"
	}
}

# wait_io DEV: waits (up to 30s) until requests are flowing on DEV (its sysfs stat moves).
wait_io() {
	local stat=/sys/block/${1#/dev/}/stat first i
	first=$(awk '{ print $1 + $5 }' "$stat")
	for ((i = 0; i < 300; i++)); do
		(($(awk '{ print $1 + $5 }' "$stat") > first + 100)) && return 0
		sleep 0.1
	done
	fail "no IO reached $1 within 30s"
}

# fio_run NAME ARGS...: runs fio, fails the test on error, prints a one-line summary.
fio_run() {
	local name=$1
	shift
	if ! fio --name="$name" --output="$WORK/fio-$name.txt" "$@"; then
		cat "$WORK/fio-$name.txt"
		fail "fio $name failed"
	fi
	grep -E "err=|IOPS=" "$WORK/fio-$name.txt" | head -n 3
	grep -q "err= 0" "$WORK/fio-$name.txt" || {
		cat "$WORK/fio-$name.txt"
		fail "fio $name reported errors"
	}
}
