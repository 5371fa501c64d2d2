#!/usr/bin/env bash
# The cost of the daemon hop: fio through a `user` row served by the Rust memory daemon, against
# the same table with a `memory` row (same userdm, same NBD export, no daemon), and against a file
# on ext4 on tmpfs (the seeds' yardstick: "dm-user/ext4 at half the speed of tmpfs"; plain tmpfs
# when no loop device can be had).
#
#   bench/dmuser/run.sh USERDM_BINARY [RESULTS_DIR]
#
# Jobs: 4k randread and randwrite at QD1 and QD32, 128k sequential read and write at QD32.
# Results: RESULTS_DIR (default bench/results/dmuser-<date>-<host>) gets one fio JSON per run,
# summary.csv (case,job,iops,bw_MiBps,lat_us_mean,lat_us_p99) and SETUP.md.
set -euo pipefail

userdm=$(realpath "${1:?usage: bench/dmuser/run.sh USERDM_BINARY [RESULTS_DIR]}")
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${2:-$root/bench/results/dmuser-$(date +%Y%m%d)-$(hostname -s)}
size_mib=${SIZE_MIB:-1024}
runtime_s=${RUNTIME_S:-20}
ramp_s=${RAMP_S:-3}
daemon_threads=${DAEMON_THREADS:-4}
sectors=$((size_mib * 2048))

mkdir -p "$out"
(cd "$root" && cargo build --release -p userdm-dmuser-daemon --examples)
examples=$root/target/release/examples

work=$(mktemp -d /tmp/dmuser-bench.XXXXXX)
export USERDM_DMUSER_DIR=$work/ctl
daemon_pid=
mounted=
loopdev=
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
    "$userdm" remove bench-user >/dev/null 2>&1 || true
    "$userdm" remove bench-mem >/dev/null 2>&1 || true
    [ -n "$mounted" ] && umount "$work/mnt" 2>/dev/null || true
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    umount "$work/tmpfs" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# job name, fio args
jobs=(
    "randread-4k-qd1|--rw=randread --bs=4k --iodepth=1"
    "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
    "randwrite-4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
    "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
    "read-128k-qd32|--rw=read --bs=128k --iodepth=32"
    "write-128k-qd32|--rw=write --bs=128k --iodepth=32"
)

run_case() { # CASE TARGET_ARGS...
    local case=$1; shift
    for j in "${jobs[@]}"; do
        local name=${j%%|*} args=${j#*|}
        # shellcheck disable=SC2086
        fio --name="$name" "$@" $args --size=${size_mib}M --time_based --runtime=$runtime_s \
            --ramp_time=$ramp_s --group_reporting --output-format=json \
            --output="$out/$case-$name.json"
        python3 - "$out/$case-$name.json" "$case" "$name" >>"$out/summary.csv" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
lat = side["clat_ns"]
p99 = lat.get("percentile", {}).get("99.000000", 0) / 1000
print(f'{sys.argv[2]},{sys.argv[3]},{side["iops"]:.0f},{side["bw"] / 1024:.1f},{lat["mean"] / 1000:.1f},{p99:.1f}')
EOF
    done
}

echo "case,job,iops,bw_MiBps,lat_us_mean,lat_us_p99" >"$out/summary.csv"

# 1. A `user` row served by the Rust memory daemon.
"$userdm" create bench-user --table "0 $sectors user 0 $sectors bench" \
    --export "nbd:unix:$work/user.sock"
"$examples/mem_daemon" "$USERDM_DMUSER_DIR/bench" $((size_mib << 20)) "$daemon_threads" &
daemon_pid=$!
fio --name=fill --ioengine=nbd --uri="nbd+unix:///bench-user?socket=$work/user.sock" \
    --rw=write --bs=1M --iodepth=8 --size=${size_mib}M --output=/dev/null
run_case user --ioengine=nbd --uri="nbd+unix:///bench-user?socket=$work/user.sock"
"$userdm" remove bench-user
wait "$daemon_pid" || true
daemon_pid=

# 2. The same table with a `memory` row: everything but the daemon hop.
"$userdm" create bench-mem --table "0 $sectors memory" --export "nbd:unix:$work/mem.sock"
fio --name=fill --ioengine=nbd --uri="nbd+unix:///bench-mem?socket=$work/mem.sock" \
    --rw=write --bs=1M --iodepth=8 --size=${size_mib}M --output=/dev/null
run_case memory --ioengine=nbd --uri="nbd+unix:///bench-mem?socket=$work/mem.sock"
"$userdm" remove bench-mem

# 3. ext4 on tmpfs (needs root and a loop device), else plain tmpfs.
mkdir -p "$work/tmpfs" "$work/mnt"
yardstick=tmpfs
if mount -t tmpfs -o size=$((size_mib * 2 + 256))M tmpfs "$work/tmpfs" 2>/dev/null; then
    truncate -s $((size_mib + 128))M "$work/tmpfs/ext4.img"
    if mkfs.ext4 -q -F "$work/tmpfs/ext4.img" 2>/dev/null &&
        loopdev=$(losetup -f --show "$work/tmpfs/ext4.img" 2>/dev/null) &&
        mount "$loopdev" "$work/mnt" 2>/dev/null; then
        mounted=1
        yardstick=ext4-on-tmpfs
        target_dir=$work/mnt
    else
        loopdev=
        target_dir=$work/tmpfs
    fi
else
    target_dir=/dev/shm
fi
run_case "$yardstick" --ioengine=io_uring --filename="$target_dir/fio.dat" --direct=0

cat >"$out/SETUP.md" <<EOF
# dm-user daemon hop benchmark

- date: $(date -Iseconds)
- host: $(hostname) ($(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo))
- kernel: $(uname -r)
- userdm: $("$userdm" --version 2>/dev/null || echo "$userdm") at $(cd "$root" && git rev-parse --short HEAD)
- fio: $(fio --version)
- size: ${size_mib} MiB, runtime ${runtime_s} s after ${ramp_s} s ramp
- user: \`0 $sectors user 0 $sectors bench\` served by examples/mem_daemon with $daemon_threads channels, NBD over a Unix socket (fio nbd engine)
- memory: \`0 $sectors memory\`, same export
- yardstick: $yardstick (fio io_uring, buffered)

See summary.csv; the cost of the daemon hop is user vs memory.
EOF
column -s, -t "$out/summary.csv"
