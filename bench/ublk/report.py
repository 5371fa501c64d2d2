#!/usr/bin/env python3
"""Turns the CSV of tests/vm/tests/ublk-bench.sh into a markdown table of medians and ratios.

Usage: report.py CSV KERNEL REPS RUNTIME
"""
import csv
import statistics
import sys
from collections import defaultdict

path, kernel, reps, runtime = sys.argv[1:5]
rows = list(csv.DictReader(open(path)))
iops = defaultdict(list)
lat = defaultdict(list)
for r in rows:
    key = (r["device"], int(r["queues"]), r["workload"])
    iops[key].append(float(r["iops"]))
    lat[key].append(float(r["lat_mean_us"]))
workloads = list(dict.fromkeys(r["workload"] for r in rows))
devices = list(dict.fromkeys((r["device"], int(r["queues"])) for r in rows))


def med(d, key):
    return statistics.median(d[key]) if key in d else None


runs = [len(v) for v in iops.values()]
complete = min(runs) == max(runs) == int(reps)


def fmt(v):
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


print(f"# ublk benchmark, Linux {kernel}\n")
if not complete:
    print(
        f"**Incomplete run**: the VM stopped early; medians are over {min(runs)} to "
        f"{max(runs)} repetitions per cell ({len(rows)} runs in all).\n"
    )
print(
    f"fio io_uring, direct, {runtime}s runs after 1s ramp, median of {reps} interleaved "
    "repetitions, all devices live in the same VM boot (QEMU TCG, 2 vCPUs: emulated, so only "
    "ratios within this table mean anything). IOPS; QD32 is 2 jobs x iodepth 16.\n"
)
print("Devices: `userdm` = ublk-serve null backend (kernel copies data), `userdm-uc` = the same "
      "with user copy; `rublk`/`rublk-uc` = rublk null target without/with `-u`; `null_blk` "
      "(configfs, defaults); `loop` = loop `--direct-io=on` on a tmpfs file.\n")
for q in sorted({q for _, q in devices}):
    devs = [d for d in devices if d[1] == q]
    print(f"## {q} queue{'s' if q > 1 else ''}\n")
    head = ["workload"] + [d for d, _ in devs]
    extra = []
    if ("userdm", q) in devs and ("rublk", q) in devs:
        extra.append(("userdm/rublk", ("userdm", q), ("rublk", q)))
    if ("userdm-uc", q) in devs and ("rublk-uc", q) in devs:
        extra.append(("userdm-uc/rublk-uc", ("userdm-uc", q), ("rublk-uc", q)))
    if ("userdm", q) in devs and ("null_blk", q) in devs:
        extra.append(("userdm/null_blk", ("userdm", q), ("null_blk", q)))
    head += [e[0] for e in extra]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w in workloads:
        cells = [w] + [fmt(med(iops, (d, q2, w))) for d, q2 in devs]
        for _, a, b in extra:
            cells.append(ratio(med(iops, (a[0], a[1], w)), med(iops, (b[0], b[1], w))))
        print("| " + " | ".join(cells) + " |")
    print()
print("Mean latency (us, median over repetitions):\n")
head = ["workload"] + [f"{d}-q{q}" for d, q in devices]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for w in workloads:
    cells = [w] + [
        (f"{med(lat, (d, q, w)):.0f}" if med(lat, (d, q, w)) is not None else "-")
        for d, q in devices
    ]
    print("| " + " | ".join(cells) + " |")
