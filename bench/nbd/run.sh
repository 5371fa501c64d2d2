#!/usr/bin/env bash
# NBD server benchmark: userdm (the nbd-serve example: a `memory` row, and a `linear` row onto a
# file on tmpfs) against nbdkit (memory and file plugins) and qemu-nbd (raw file on tmpfs), all
# over Unix sockets, driven by fio's nbd engine (libnbd).
#
#   bench/nbd/run.sh [--repeats N] [--runtime SECONDS] [--size SIZE] [--out FILE] [--only REGEX]
#
# Rows: 4k random read and write at QD1 and QD32, 128k sequential read and write at QD32, each
# with 1 and 4 connections (fio --numjobs: one libnbd connection per job). Every server is
# started once and filled with data (so no server answers reads from holes); then each repeat
# runs every row on every server back to back, so load from elsewhere on the machine falls on
# all alike. Results: FILE (default bench/results/nbd.md) with per-row medians and the ratios
# userdm/peer, FILE's .csv (raw runs) and, when gnuplot is installed, FILE's .png.
# Needs fio, nbdkit, qemu-nbd (scripts/install-deps), python3, a tmpfs at /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/../.."

repeats=3
runtime=2
size=256M
out=bench/results/nbd.md
only=.
while [ $# -gt 0 ]; do
    case "$1" in
        --repeats) repeats=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
for tool in fio nbdkit qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (scripts/install-deps)" >&2; exit 1; }
done

cargo build --release -q -p userdm-nbd --example nbd-serve
serve=$PWD/target/release/examples/nbd-serve

work=$(mktemp -d /dev/shm/nbd-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# name|command (SOCK is replaced by the socket path)
servers=(
    "userdm-mem|$serve --unix SOCK --memory $size"
    "userdm-file|$serve --unix SOCK --file $work/userdm.img"
    "nbdkit-mem|nbdkit -f -U SOCK memory $size"
    "nbdkit-file|nbdkit -f -U SOCK file $work/nbdkit.img"
    "qemu-nbd|qemu-nbd -k SOCK -f raw -t -e 16 $work/qemu.img"
)
# name|fio args
jobs=(
    "randread-4k-qd1|--rw=randread --bs=4k --iodepth=1"
    "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
    "randwrite-4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
    "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
    "read-128k-qd32|--rw=read --bs=128k --iodepth=32"
    "write-128k-qd32|--rw=write --bs=128k --iodepth=32"
)

for f in userdm nbdkit qemu; do truncate -s "$size" "$work/$f.img"; done
names=()
for s in "${servers[@]}"; do
    name=${s%%|*} cmd=${s#*|}
    [[ $name =~ $only ]] || continue
    sock=$work/$name.sock
    # shellcheck disable=SC2086
    ${cmd//SOCK/$sock} </dev/null >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    [ -S "$sock" ] || { echo "run.sh: $name did not start:"; cat "$work/$name.log"; exit 1; }
    # Fill: every byte written once, so reads find data everywhere.
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=write --bs=1M \
        --iodepth=8 --size="$size" --output=/dev/null
    names+=("$name")
done

csv=${out%.md}.csv
mkdir -p "$(dirname "$out")"
echo "server,job,conns,repeat,iops,bw_MiBps,lat_us_mean" >"$csv"
started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$repeats"); do
    for j in "${jobs[@]}"; do
        job=${j%%|*} args=${j#*|}
        for conns in 1 4; do
            for name in "${names[@]}"; do
                sock=$work/$name.sock
                # shellcheck disable=SC2086
                fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" $args \
                    --numjobs="$conns" --size="$size" --time_based --runtime="$runtime" \
                    --ramp_time=0.5 --group_reporting --output-format=json \
                    --output="$work/out.json"
                python3 - "$work/out.json" "$name,$job,$conns,$r" >>"$csv" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
print(f'{sys.argv[2]},{side["iops"]:.0f},{side["bw"] / 1024:.1f},{side["clat_ns"]["mean"] / 1000:.1f}')
EOF
            done
        done
    done
    echo "repeat $r done after $(( $(date +%s) - started ))s"
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$csv" "$out" "$repeats" "$runtime" "$size" "$load_before" "$load_after" <<'EOF'
import csv, statistics, sys, subprocess, platform, os
path, out, repeats, runtime, size, load_before, load_after = sys.argv[1:8]
rows = list(csv.DictReader(open(path)))
med = {}
for key in {(r["server"], r["job"], r["conns"]) for r in rows}:
    vals = [float(r["iops"]) for r in rows if (r["server"], r["job"], r["conns"]) == key]
    med[key] = statistics.median(vals)
servers = [s for s in ["userdm-mem", "userdm-file", "nbdkit-mem", "nbdkit-file", "qemu-nbd"]
           if any(k[0] == s for k in med)]
jobs = []
for r in rows:
    if (r["job"], r["conns"]) not in jobs:
        jobs.append((r["job"], r["conns"]))
pairs = [("userdm-mem", "nbdkit-mem"), ("userdm-file", "nbdkit-file"), ("userdm-file", "qemu-nbd")]
pairs = [p for p in pairs if p[0] in servers and p[1] in servers]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
def ver(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except Exception:
        return "?"
lines = [
    "# NBD servers over a Unix socket: userdm vs nbdkit vs qemu-nbd",
    "",
    f"`bench/nbd/run.sh --repeats {repeats} --runtime {runtime} --size {size}`, one run on this "
    f"machine ({os.cpu_count()} vCPU {cpu}, kernel {platform.release()}). "
    f"{ver(['nbdkit', '--version'])}; {ver(['qemu-nbd', '--version'])}; {ver(['fio', '--version'])} "
    "with its nbd engine (libnbd). Each cell is the median IOPS of the repeats "
    "(128k rows: IOPS x 128 KiB = throughput); every export was filled with data first, "
    "files live on tmpfs (/dev/shm). "
    f"Load average (1, 5, 15 min) before the runs: {load_before}; after: {load_after} "
    "(anything above ~1 is other work on this 2-vCPU machine, which adds noise).",
    "",
    "Servers: **userdm-mem** = `nbd-serve --memory` (the `memory` target through the device "
    "engine), **userdm-file** = `nbd-serve --file` (a `linear` row onto the file), "
    "**nbdkit-mem** = `nbdkit memory`, **nbdkit-file** = `nbdkit file`, **qemu-nbd** = "
    "`qemu-nbd -f raw -t -e 16`. Connections: fio `--numjobs` (one libnbd connection per job).",
    "",
    "| job | conns | " + " | ".join(servers) + " | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |",
    "|---|---|" + "---:|" * (len(servers) + len(pairs)),
]
worst = None
for job, conns in jobs:
    cells = [f"{med[(s, job, conns)]:.0f}" for s in servers]
    ratios = []
    for a, b in pairs:
        x = med[(a, job, conns)] / med[(b, job, conns)]
        worst = x if worst is None else min(worst, x)
        ratios.append(f"{'**' if x < 1 else ''}{x:.2f}{'**' if x < 1 else ''}")
    lines.append(f"| {job} | {conns} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
lines += ["", f"Smallest ratio: {worst:.2f} (bold: a row where userdm is behind)." if worst else "",
          "", f"Raw runs: `{os.path.basename(path)}`."]
open(out, "w").write("\n".join(lines) + "\n")
dat = out[:-3] + ".dat"
with open(dat, "w") as f:
    f.write("row " + " ".join(servers) + "\n")
    for job, conns in jobs:
        f.write(f"{job}/{conns}c " + " ".join(f"{med[(s, job, conns)]:.0f}" for s in servers) + "\n")
print("\n".join(lines))
EOF

if command -v gnuplot >/dev/null; then
    dat=${out%.md}.dat
    n=$(head -1 "$dat" | wc -w)
    gnuplot <<EOF
set terminal pngcairo size 1400,640 noenhanced
set bmargin 8
set rmargin 8
set output "${out%.md}.png"
set title "NBD over a Unix socket: median IOPS (fio nbd engine)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel "IOPS (log)"
set xtics rotate by -30
set key top right
plot for [i=2:$n] "$dat" using i:xtic(1) title columnheader(i)
EOF
    echo "plot: ${out%.md}.png"
fi
