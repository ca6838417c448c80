#!/usr/bin/env python3
"""plot_scaling.py: draws the CSV that scaling.sbatch writes as one PNG with two panels,
tokens/s against ranks (with the linear line through each sweep's smallest run) and the
scaling efficiency against ranks, one line per mode (weak, strong).

    python3 plot_scaling.py scaling.csv [scaling.png]

The PNG goes next to the CSV unless named. Needs matplotlib; without it the script says
so and exits 2, and the CSV stays the result. A CSV that is missing, empty or lacks a
column is refused with a line naming the problem (exit 1)."""

import csv
import os
import sys

COLUMNS = ("mode", "nodes", "ranks", "global_batch", "tokens_per_s", "efficiency")


def fail(msg, status=1):
    print(f"plot_scaling.py: {msg}", file=sys.stderr)
    sys.exit(status)


def read_sweeps(path):
    """{mode: [(ranks, nodes, global_batch, tokens_per_s, efficiency), ...]} sorted by ranks"""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    if not rows:
        fail(f"{path} holds no measurements (only a header or nothing)")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        fail(f"{path} lacks the column(s) {', '.join(missing)} (is it scaling.sbatch's CSV?)")
    sweeps = {}
    for n, r in enumerate(rows, start=2):
        try:
            point = (int(r["ranks"]), int(r["nodes"]), int(r["global_batch"]), float(r["tokens_per_s"]),
                     float(r["efficiency"]))
        except ValueError:
            fail(f"{path} line {n}: a value is not a number: {r}")
        sweeps.setdefault(r["mode"], []).append(point)
    for points in sweeps.values():
        points.sort()
    return sweeps


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1].strip())
        sys.exit(0 if len(sys.argv) == 2 else 1)
    csv_path = sys.argv[1]
    png_path = sys.argv[2] if len(sys.argv) == 3 else os.path.splitext(csv_path)[0] + ".png"
    sweeps = read_sweeps(csv_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail(f"matplotlib is not installed, so no plot was drawn; install it (python3 -m pip install matplotlib) "
             f"and run: python3 {sys.argv[0]} {csv_path}", 2)

    fig, (ax_tps, ax_eff) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, points in sorted(sweeps.items()):
        ranks = [p[0] for p in points]
        tps = [p[3] for p in points]
        line, = ax_tps.plot(ranks, tps, "o-", label=mode)
        # the linear line through the smallest run: what perfect scaling would give
        r0, t0 = ranks[0], tps[0]
        ax_tps.plot(ranks, [t0 * r / r0 for r in ranks], "--", color=line.get_color(), alpha=0.5,
                    label=f"{mode}, linear")
        ax_eff.plot(ranks, [p[4] for p in points], "o-", color=line.get_color(), label=mode)
    # the node count of each rank count goes under its tick
    nodes = {p[0]: p[1] for pts in sweeps.values() for p in pts}
    all_ranks = sorted(nodes)
    for ax in (ax_tps, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ranks)
        ax.set_xticklabels([f"{r}\n{nodes[r]} node{'s' if nodes[r] > 1 else ''}" for r in all_ranks])
        ax.minorticks_off()
        ax.set_xlabel("ranks (GPUs)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_tps.set_yscale("log")
    ax_tps.set_ylabel("tokens/s (whole job)")
    ax_tps.set_title("throughput (dashed: linear scaling)")
    ax_eff.set_ylabel("efficiency (1 = linear scaling)")
    ax_eff.set_ylim(0, max(1.1, max(p[4] for pts in sweeps.values() for p in pts) * 1.05))
    ax_eff.axhline(1.0, color="gray", lw=0.8)
    ax_eff.set_title("scaling efficiency")
    fig.suptitle(f"deltamla scaling: {os.path.basename(csv_path)}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"plot_scaling.py: wrote {png_path}")


if __name__ == "__main__":
    main()
