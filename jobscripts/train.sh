#!/bin/bash
# train.sh: train on a workstation without Slurm, as the seed's launcher does: one MPI
# rank per GPU that nvidia-smi lists (started with mpirun), or one process on the CPU
# when there is no GPU.
#
#   DELTAMLA_DATA=data/licenses DELTAMLA_FLAGS="--size tiny --max_iters 300" \
#       jobscripts/train.sh [batch_size [block_size [output_dir [resume [optimizer]]]]]
#
# Arguments (the seed launcher's, in its order): micro-batch per rank (8), sequence length
# (2048), output directory (out), resume (auto: from output_dir/latest if there; true: from
# latest, which must exist; false: start afresh; or a checkpoint file), optimizer (muon).
# The seed's sixth argument, a Hugging Face repository, is accepted and not used (deltamla
# does not upload; `deltamla ckpt export` writes the folder to upload).
# Variables: DELTAMLA_DATA (required unless DELTAMLA_FLAGS has --data), DELTAMLA_FLAGS,
# the seed's LATENT_RATIO N_EXPERTS N_ACTIVATED DELTANET_LATENT_DIM DELTANET_SHARE_QK
# MLA_Q_LORA_RANK, DELTAMLA_BIN, DELTAMLA_NGPUS (the rank count instead of nvidia-smi's
# GPU count; 0 = one CPU process), MPIRUN (the launcher, default mpirun).
# To stop with a checkpoint: kill -USR1 the process (mpirun passes SIGUSR1 on to every
# rank); each rank finishes its step, the run saves and exits 0, and the same command
# resumes.
set -u
DM_LIB_DIR=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$DM_LIB_DIR/lib.sh"

case "${1:-}" in
    -h | --help)
        sed -n '2,/^set -u/{/^set -u/d;s/^# \{0,1\}//;p}' "$0"
        exit 0
        ;;
esac
[ $# -le 6 ] || dm_die "train.sh takes at most 6 arguments (batch_size block_size output_dir resume optimizer hf_repo), got $#; put other flags in DELTAMLA_FLAGS"
batch=${1:-8} block=${2:-2048} out=${3:-out} resume=${4:-auto} opt=${5:-muon}
[ -z "${6:-}" ] || dm_say "note: the Hugging Face repository '$6' is not used (deltamla does not upload); deltamla ckpt export $out --out DIR writes a folder to upload"

dm_find_bin
dm_train_flags "$batch" "$block" "$out" "$resume" "$opt" 0

ngpu=${DELTAMLA_NGPUS:-}
if [ -z "$ngpu" ]; then
    ngpu=0
    if command -v nvidia-smi >/dev/null; then ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); fi
fi
[[ "$ngpu" =~ ^[0-9]+$ ]] || dm_die "DELTAMLA_NGPUS=$ngpu is not a count"

if [ "$ngpu" -le 1 ]; then
    if [ "$ngpu" -eq 0 ]; then dm_say "no GPU found (nvidia-smi -L): one process on the CPU"; else dm_say "1 GPU: one process"; fi
    dm_say "$DM_BIN train ${DM_FLAGS[*]}"
    exec "$DM_BIN" train "${DM_FLAGS[@]}"
fi

launcher=${MPIRUN:-mpirun}
command -v "$launcher" >/dev/null || dm_die "$launcher is not on PATH: $ngpu GPUs need one MPI rank each (install Open MPI, or set MPIRUN)"
mpi_args=(-np "$ngpu")
# Open MPI refuses root without being told; the ranks share the cores between them
if "$launcher" --version 2>/dev/null | grep -q 'Open MPI'; then
    [ "$(id -u)" -ne 0 ] || mpi_args+=(--allow-run-as-root)
    mpi_args+=(--bind-to none)
fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(nproc 2>/dev/null || echo "$ngpu")
    export OMP_NUM_THREADS=$((cores / ngpu > 0 ? cores / ngpu : 1))
fi
dm_say "$ngpu GPUs: $launcher ${mpi_args[*]} (OMP_NUM_THREADS=$OMP_NUM_THREADS per rank)"
dm_say "$DM_BIN train ${DM_FLAGS[*]}"
exec "$launcher" "${mpi_args[@]}" "$DM_BIN" train "${DM_FLAGS[@]}"
