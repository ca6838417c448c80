#!/usr/bin/env bash
# kernel_trace.sh: every GPU kernel of one training step with its duration, from Nsight
# Compute (ncu), summed by name by benchmarks/kernel_trace.py. On the GPU machine, after
# `make bench`:
#   benchmarks/kernel_trace.sh [OUTDIR] [bench_step flags...]
# Default flags: the performance issue's configuration (moe-1b, latent GDN, B 8, T 2048).
# Writes OUTDIR/kernels.csv (one row per launch) and OUTDIR/kernels.txt (the summary).
# ncu runs each kernel alone at the GPU's own clocks and with warm caches
# (--clock-control none --cache-control none), so the durations are those of a normal
# run, minus any overlap. Takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-kernel_trace}
shift || true
flags=("$@")
[ ${#flags[@]} -gt 0 ] || flags=(--size moe-1b --deltanet_latent_dim 256 --deltanet_share_qk --mla_q_lora_rank 256
                                 --batch_size 8 --block_size 2048)
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
[ -x "$ncu" ] || { echo "kernel_trace.sh: Nsight Compute (ncu) not found" >&2; exit 1; }
[ -x build/bench/bench_step ] || { echo "kernel_trace.sh: build/bench/bench_step missing (make bench)" >&2; exit 1; }
mkdir -p "$out"
# two steps (a warm-up and one measured) and the update-phase timing: the summary takes the second
"$ncu" --metrics gpu__time_duration.sum --cache-control none --clock-control none --launch-count 6000 \
    --csv --page raw build/bench/bench_step --device cuda "${flags[@]}" --bench_steps 1 --bench_warmup 1 \
    > "$out/kernels.csv"
python3 benchmarks/kernel_trace.py "$out/kernels.csv" --detail to_bf16_kernel | tee "$out/kernels.txt"
