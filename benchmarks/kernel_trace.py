#!/usr/bin/env python3
"""kernel_trace.py: the GPU kernels of one training step, summed by kernel name.

Reads the CSV that benchmarks/kernel_trace.sh has Nsight Compute write (one row per kernel
launch, its duration gpu__time_duration.sum) for a bench_step run, cuts out one whole
step (from one launch of the embedding forward kernel to the next: the forward, the
backward and the update) and prints, per kernel name, its time in the step, its share
and its launch count, then the step's total and kernel count. With --detail NAME it
also lists that kernel's launches by grid size.

Nsight Compute runs the kernels one at a time, so the total is the sum of kernel times
with no overlap and no idle time between launches: next to the step time bench_step
measures without the profiler, the difference is what launch gaps (or the overlap of
the optimizer's lanes) amount to.
"""
import argparse
import collections
import csv
import re
import sys


def read_launches(path):
    with open(path, newline="") as f:
        lines = f.read().split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"kernel_trace.py: {path} holds no Nsight Compute CSV table (no \"ID\" header row)")
    rows = list(csv.reader(lines[start:]))
    hdr = rows[0]
    try:
        name_col, time_col, grid_col = hdr.index("Kernel Name"), hdr.index("gpu__time_duration.sum"), hdr.index("Grid Size")
    except ValueError as e:
        sys.exit(f"kernel_trace.py: {path}: column missing ({e})")
    out = []
    for r in rows[2:]:  # rows[1] holds the units
        if len(r) != len(hdr):
            continue
        out.append((r[name_col], float(r[time_col].replace(",", "")) / 1e3, r[grid_col]))  # ns -> us
    return out


def short(name):
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name.replace("void ", "")[:64]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--marker", default="embedding_forward_kernel", help="kernel that opens each step")
    ap.add_argument("--step", type=int, default=1, help="which step (0 = the first profiled)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--detail", action="append", default=[], help="list this kernel's launches by grid size")
    a = ap.parse_args()
    launches = read_launches(a.csv)
    marks = [i for i, (n, _, _) in enumerate(launches) if a.marker in n]
    if len(marks) < a.step + 2:
        sys.exit(f"kernel_trace.py: {len(marks)} launches of {a.marker} in {a.csv}: no whole step {a.step} "
                 "(profile more launches)")
    lo, hi = marks[a.step], marks[a.step + 1]
    step = launches[lo:hi]
    total = sum(t for _, t, _ in step)
    by = collections.defaultdict(lambda: [0, 0.0])
    for n, t, _ in step:
        by[short(n)][0] += 1
        by[short(n)][1] += t
    print(f"# one step: launches {lo}..{hi - 1} of {len(launches)}, {hi - lo} kernels, {total / 1e3:.2f} ms of kernel time")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel")
    for n, (c, t) in sorted(by.items(), key=lambda x: -x[1][1])[: a.top]:
        print(f"{t / 1e3:9.3f} {100 * t / total:5.1f}% {c:6d}  {n}")
    rest = sorted(by.items(), key=lambda x: -x[1][1])[a.top:]
    if rest:
        print(f"{sum(t for _, (c, t) in rest) / 1e3:9.3f} {100 * sum(t for _, (c, t) in rest) / total:5.1f}% "
              f"{sum(c for _, (c, t) in rest):6d}  ({len(rest)} other kernels)")
    for d in a.detail:
        grids = collections.defaultdict(lambda: [0, 0.0])
        for n, t, g in step:
            if d in n:
                grids[g][0] += 1
                grids[g][1] += t
        print(f"\n# {d} by grid size")
        for g, (c, t) in sorted(grids.items(), key=lambda x: -x[1][1]):
            print(f"{t / 1e3:9.3f} ms {c:5d} calls {t / c:8.1f} us/call  grid {g}")


if __name__ == "__main__":
    main()
