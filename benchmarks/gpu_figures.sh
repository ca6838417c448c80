#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one go, on a machine with 4 GPUs (fewer:
# the multi-GPU parts shrink to what is there). Writes into OUT_DIR (default ./figures):
#   step.txt          bench_step, moe-1b on one GPU: tokens/s, MFU, per-family times vs floors
#   step_gc.txt       the same with --gradient_checkpointing (memory against speed)
#   kernels.txt       benchmarks/kernel_trace.sh: every kernel of one step, summed by name (ncu)
#   mixers.txt        bench_mixers: Gated DeltaNet and MLA attention alone at the issue's shapes
#   dist.csv          benchmarks/bench_dist.sh cuda: 1, 2, 4 GPUs, data / expert parallel, ZeRO-1
#   alltoall.txt      bench_alltoall: the all-to-all alone on 2 and 4 GPUs, 64 and 192 MiB
#   attention_cudnn.txt  PyTorch SDPA on cuDNN at the MLA shapes (needs torch)
#   scaling.csv/.png  the weak-scaling rows of dist.csv in scaling.sbatch's format, plotted
# usage: benchmarks/gpu_figures.sh DATA [OUT_DIR]     (DATA: a text file or token shards)
set -u
cd "$(dirname "$0")/.."
data=${1:?usage: benchmarks/gpu_figures.sh DATA [OUT_DIR]}
out=${2:-figures}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
gpus=$(nvidia-smi -L | grep -c '^GPU')
size=(--size moe-1b --deltanet_latent_dim 256 --deltanet_share_qk --mla_q_lora_rank 256 --batch_size 8 --block_size 2048)
build/bench/bench_step "${size[@]}" --device cuda --bench_steps 5 --bench_warmup 2 >"$out/step.txt" 2>&1
build/bench/bench_step "${size[@]}" --device cuda --bench_steps 5 --bench_warmup 2 --gradient_checkpointing \
    >"$out/step_gc.txt" 2>&1
bash benchmarks/kernel_trace.sh "$out/trace" >/dev/null 2>&1 && cp "$out/trace/kernels.txt" "$out/kernels.txt"
build/bench/bench_mixers --device cuda >"$out/mixers.txt" 2>&1
BENCH_DIR=$(mktemp -d) bash benchmarks/bench_dist.sh cuda "$data" >"$out/dist.csv"
: >"$out/alltoall.txt"
for np in 2 4; do
    [ "$np" -le "$gpus" ] || continue
    for mib in 64 192; do
        mpirun -np $np --bind-to none build/bench/bench_alltoall --device cuda --mib $mib >>"$out/alltoall.txt" 2>&1
    done
done
python3 benchmarks/attention_cudnn.py >"$out/attention_cudnn.txt" 2>&1
python3 - "$out/dist.csv" "$out/scaling.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["ep"] == "1" and r["zero"] == "0"]
base = float(rows[0]["tokens_per_s_per_rank"])
with open(sys.argv[2], "w") as f:
    f.write("mode,nodes,ranks,batch_per_rank,accumulation,global_batch,block_size,tokens_per_s,tokens_per_s_per_rank,efficiency\n")
    for r in rows:
        n = int(r["ranks"])
        f.write(f"weak,1,{n},8,1,{8 * n},2048,{r['tokens_per_s']},{r['tokens_per_s_per_rank']},"
                f"{float(r['tokens_per_s_per_rank']) / base:.3f}\n")
PY
python3 jobscripts/plot_scaling.py "$out/scaling.csv" "$out/scaling.png" || true
echo "figures in $out"
