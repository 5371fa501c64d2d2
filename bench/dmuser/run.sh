#!/usr/bin/env bash
# The cost of the daemon hop: fio through a `user` row served by the Rust memory daemon, against
# the same table with a `memory` row (same userdm, same NBD export, no daemon), and against a file
# on ext4 on tmpfs (the seeds' yardstick: "dm-user/ext4 at half the speed of tmpfs"; plain tmpfs
# when no loop device can be had).
#
#   bench/dmuser/run.sh USERDM_BINARY [RESULTS_DIR]
#
# Jobs: 4k randread and randwrite at QD1 and QD32, 128k sequential read and write at QD32, each
# repeated REPS times (default 3) with the cases interleaved, so that load on the machine hits
# every case alike. Results: RESULTS_DIR (default bench/results/dmuser-<date>-<host>) gets one fio
# JSON per run, summary.csv (rep,case,job,iops,bw_MiBps,lat_us_mean,lat_us_p99), SETUP.md, and
# bench/results/dmuser.md: medians and the ratios user/memory (the daemon hop) and
# user/yardstick.
set -euo pipefail

userdm=$(realpath "${1:?usage: bench/dmuser/run.sh USERDM_BINARY [RESULTS_DIR]}")
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${2:-$root/bench/results/dmuser-$(date +%Y%m%d)-$(hostname -s)}
size_mib=${SIZE_MIB:-1024}
runtime_s=${RUNTIME_S:-5}
ramp_s=${RAMP_S:-1}
reps=${REPS:-3}
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

run_case() { # REP CASE TARGET_ARGS...
    local rep=$1 case=$2; shift 2
    for j in "${jobs[@]}"; do
        local name=${j%%|*} args=${j#*|}
        # shellcheck disable=SC2086
        fio --name="$name" "$@" $args --size=${size_mib}M --time_based --runtime=$runtime_s \
            --ramp_time=$ramp_s --group_reporting --output-format=json \
            --output="$out/$case-$name-$rep.json"
        python3 - "$out/$case-$name-$rep.json" "$rep" "$case" "$name" >>"$out/summary.csv" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
lat = side["clat_ns"]
p99 = lat.get("percentile", {}).get("99.000000", 0) / 1000
print(f'{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{side["iops"]:.0f},{side["bw"] / 1024:.1f},{lat["mean"] / 1000:.1f},{p99:.1f}')
EOF
    done
}

echo "rep,case,job,iops,bw_MiBps,lat_us_mean,lat_us_p99" >"$out/summary.csv"

# 1. A `user` row served by the Rust memory daemon.
"$userdm" create bench-user --table "0 $sectors user 0 $sectors bench" \
    --export "nbd:unix:$work/user.sock"
"$examples/mem_daemon" "$USERDM_DMUSER_DIR/bench" $((size_mib << 20)) "$daemon_threads" &
daemon_pid=$!
fio --name=fill --ioengine=nbd --uri="nbd+unix:///bench-user?socket=$work/user.sock" \
    --rw=write --bs=1M --iodepth=8 --size=${size_mib}M --output=/dev/null

# 2. The same table with a `memory` row: everything but the daemon hop.
"$userdm" create bench-mem --table "0 $sectors memory" --export "nbd:unix:$work/mem.sock"
fio --name=fill --ioengine=nbd --uri="nbd+unix:///bench-mem?socket=$work/mem.sock" \
    --rw=write --bs=1M --iodepth=8 --size=${size_mib}M --output=/dev/null

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
for rep in $(seq 1 "$reps"); do
    run_case "$rep" user --ioengine=nbd --uri="nbd+unix:///bench-user?socket=$work/user.sock"
    run_case "$rep" memory --ioengine=nbd --uri="nbd+unix:///bench-mem?socket=$work/mem.sock"
    run_case "$rep" "$yardstick" --ioengine=io_uring --filename="$target_dir/fio.dat" --direct=0
done
"$userdm" remove bench-user
"$userdm" remove bench-mem
wait "$daemon_pid" || true
daemon_pid=

cat >"$out/SETUP.md" <<EOF
# dm-user daemon hop benchmark

- date: $(date -Iseconds)
- host: $(hostname) ($(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo))
- kernel: $(uname -r)
- userdm: $("$userdm" --version 2>/dev/null || echo "$userdm") at $(cd "$root" && git rev-parse --short HEAD)
- fio: $(fio --version)
- size: ${size_mib} MiB, runtime ${runtime_s} s after ${ramp_s} s ramp, ${reps} repetitions (medians reported)
- user: \`0 $sectors user 0 $sectors bench\` served by examples/mem_daemon with $daemon_threads channels, NBD over a Unix socket (fio nbd engine)
- memory: \`0 $sectors memory\`, same export
- yardstick: $yardstick (fio io_uring, buffered)

See summary.csv; the cost of the daemon hop is user vs memory.
EOF
python3 - "$out/summary.csv" "$yardstick" "$root/bench/results/dmuser.md" "$out" <<'EOF'
import csv, statistics, sys, os
rows = list(csv.DictReader(open(sys.argv[1])))
yard, md, outdir = sys.argv[2], sys.argv[3], sys.argv[4]
med = {}
for case in {r["case"] for r in rows}:
    for job in {r["job"] for r in rows}:
        vals = [float(r["iops"]) for r in rows if r["case"] == case and r["job"] == job]
        if vals:
            med[case, job] = statistics.median(vals)
jobs = sorted({r["job"] for r in rows}, key=lambda j: [r["job"] for r in rows].index(j))
lines = [
    "# dm-user: the cost of the daemon hop",
    "",
    f"Medians of IOPS over the repetitions; raw runs in `{os.path.relpath(outdir, os.path.dirname(md))}/`.",
    "`user`: a `user` row served by the Rust memory daemon; `memory`: the same table and export",
    f"with a `memory` row (no daemon); `{yard}`: fio on a file there (the seeds' yardstick).",
    "",
    f"| job | user | memory | {yard} | user/memory | user/{yard} |",
    "|---|---:|---:|---:|---:|---:|",
]
for job in jobs:
    u, m, y = med.get(("user", job)), med.get(("memory", job)), med.get((yard, job))
    lines.append(f"| {job} | {u:.0f} | {m:.0f} | {y:.0f} | {u / m:.2f} | {u / y:.2f} |")
open(md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
