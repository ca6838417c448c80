#!/usr/bin/env bash
# Distributed step benchmark: the training step split into compute, gradient reduction
# and expert all-to-all (deltamla train --comm_timing) for 1, 2 and 4 ranks, data
# parallel and expert parallel, written as CSV to stdout (and the logs to $BENCH_DIR).
#   benchmarks/bench_dist.sh cpu  DATA            # tiny config, CPU backend, MPI
#   benchmarks/bench_dist.sh cuda DATA [flags]    # moe-1b (issue figures), one rank per GPU, NCCL
# --comm_timing synchronises the device around each all-to-all and before the gradient
# reductions are joined, so reduce_ms is the part of the reduction the backward did not
# hide and alltoall_ms the all-to-all time itself (their GB/s: bytes sent to other ranks
# over that time). Steps 0-4 are warm-up; the figures average steps 5-14.
set -u
cd "$(dirname "$0")/.."
device=${1:?usage: bench_dist.sh cpu|cuda DATA [extra train flags]}
data=${2:?usage: bench_dist.sh cpu|cuda DATA [extra train flags]}
shift 2
dir=${BENCH_DIR:-$(mktemp -d)}
mkdir -p "$dir"
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
if [ "$device" = cuda ]; then
    gpus=$(nvidia-smi -L | grep -c '^GPU')
    size=(--size moe-1b --deltanet_latent_dim 256 --deltanet_share_qk --mla_q_lora_rank 256 --batch_size 8
          --block_size 2048)
    threads=0
else
    gpus=4
    size=(--size tiny --batch_size 4 --block_size 256)
    threads=1
fi
echo "device,ranks,ep,zero,tokens_per_s,tokens_per_s_per_rank,step_ms,reduce_ms,alltoall_ms,alltoall_GBps,peak_mem_GiB"
# BENCH_LAYOUTS overrides the list of "ranks ep zero" triples
IFS=, read -r -a layouts <<<"${BENCH_LAYOUTS:-1 1 0,2 1 0,2 2 0,4 1 0,4 2 0,4 4 0,4 1 1}"
for layout in "${layouts[@]}"; do
    read -r np ep zero <<<"$layout"
    [ "$np" -le "$gpus" ] || continue
    name="np${np}_ep${ep}_zero${zero}"
    mpirun -np "$np" --bind-to none bin/deltamla train --device "$device" --threads $threads "${size[@]}" \
        --data "$data" --max_iters 15 --warmup_iters 2 --log_interval 5 --checkpoint_interval 0 --comm_timing \
        --ep "$ep" --zero "$zero" --output_dir "$dir/$name" "$@" >"$dir/$name.log" 2>&1 ||
        { echo "# $name failed: $(grep -m1 'error' "$dir/$name.log")" >&2; continue; }
    python3 - "$dir/$name/metrics.jsonl" "$device" "$np" "$ep" "$zero" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"step_ms"' in l]
r = rows[-1]
np_ = int(sys.argv[3])
print(f"{sys.argv[2]},{np_},{sys.argv[4]},{sys.argv[5]},{r['tokens_per_s']:.0f},{r['tokens_per_s'] / np_:.0f},"
      f"{r['step_ms']:.2f},{r['reduce_ms']:.2f},{r['alltoall_ms']:.2f},{r['alltoall_gbps']:.2f},"
      f"{r['peak_mem_gib']:.2f}")
PY
done
