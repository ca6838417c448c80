# shellcheck shell=bash
# lib.sh: what the job scripts share, sourced by train.sbatch, train-multinode.sbatch,
# prep.sbatch, scaling.sbatch and train.sh (not run on its own).
#
# It finds the deltamla binary, turns the seed launcher's positional arguments and
# environment variables into deltamla flags, checks the data and the output directory,
# picks srun's MPI plugin, and runs the training of a job with the signal handling that
# a requeue chain needs. Every check that fails prints one line starting with
# "deltamla job: error:" that names what is missing, and exits 1.
#
# Variables read (all optional unless a script says otherwise):
#   DELTAMLA_BIN          the binary; else `deltamla` on PATH, $DELTAMLA_HOME/bin, or the
#                         tree these scripts sit in (source tree or installed prefix)
#   DELTAMLA_DATA         training data: a directory of token shards, a shard, a text file
#   DELTAMLA_FLAGS        more flags for `deltamla train`, appended last (so they win),
#                         e.g. "--size moe-1b --max_iters 20000" or "--device cpu"
#   LATENT_RATIO N_EXPERTS N_ACTIVATED DELTANET_LATENT_DIM DELTANET_SHARE_QK
#   MLA_Q_LORA_RANK       the seed launcher's variables, mapped onto the flags of the
#                         same names; unset means deltamla's default (the preset's)
#   DELTAMLA_SRUN_MPI     srun's --mpi plugin; default pmix when this Slurm has it
#   DELTAMLA_MAX_RESTARTS requeues allowed by train*.sbatch (default 20)

dm_say() { echo "deltamla job: $*"; }
dm_die() {
    echo "deltamla job: error: $*" >&2
    exit 1
}

# DM_LIB_DIR: the directory this file is in (the job scripts set it before sourcing,
# since sbatch runs them from a copy)
DM_LIB_DIR=${DM_LIB_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

# dm_find_bin: sets DM_BIN to an executable deltamla, or stops naming where it looked
dm_find_bin() {
    local c tried=()
    if [ -n "${DELTAMLA_BIN:-}" ]; then
        [ -x "$DELTAMLA_BIN" ] || dm_die "DELTAMLA_BIN=$DELTAMLA_BIN is not an executable file"
        DM_BIN=$DELTAMLA_BIN
        return
    fi
    c=$(command -v deltamla 2>/dev/null) && [ -n "$c" ] && { DM_BIN=$c; return; }
    tried+=("deltamla on PATH")
    for c in ${DELTAMLA_HOME:+"$DELTAMLA_HOME/bin/deltamla"} "$DM_LIB_DIR/../bin/deltamla" "$DM_LIB_DIR/../../../bin/deltamla"; do
        if [ -x "$c" ]; then
            DM_BIN=$(cd "$(dirname "$c")" && pwd)/deltamla
            return
        fi
        tried+=("$c")
    done
    dm_die "the deltamla binary is not found (looked for: ${tried[*]}); load the module (module load deltamla), build it (make), or set DELTAMLA_BIN"
}

# dm_require_slurm SCRIPT [WITHOUT_SLURM]: stops unless this runs inside a Slurm job,
# saying what to do instead on a machine without Slurm
dm_require_slurm() {
    [ -n "${SLURM_JOB_ID:-}" ] ||
        dm_die "$1 is a Slurm batch script and SLURM_JOB_ID is not set: submit it with sbatch $1 ... (without Slurm: ${2:-use train.sh})"
    command -v srun >/dev/null || dm_die "srun is not on PATH inside job $SLURM_JOB_ID"
}

# dm_check_data PATH: the training data must exist and be readable
dm_check_data() {
    local d=$1
    [ -e "$d" ] || dm_die "the training data $d does not exist (make token shards with: deltamla prep --input TEXT --output $d, or sbatch prep.sbatch)"
    [ -r "$d" ] || dm_die "the training data $d is not readable"
    if [ -d "$d" ] && ! compgen -G "$d/shard_*.h5" >/dev/null; then
        dm_die "the data directory $d holds no token shards (shard_*.h5); make them with deltamla prep"
    fi
}

# dm_check_outdir DIR: creates DIR if needed; it must be writable
dm_check_outdir() {
    mkdir -p "$1" 2>/dev/null || dm_die "cannot create the output directory $1"
    { [ -w "$1" ] && [ -x "$1" ]; } || dm_die "the output directory $1 is not writable"
}

# dm_seed_flags: appends to DM_FLAGS the flags for the seed launcher's variables that are set
dm_seed_flags() {
    local var flag
    for var in LATENT_RATIO:latent_ratio N_EXPERTS:n_experts N_ACTIVATED:n_activated \
        DELTANET_LATENT_DIM:deltanet_latent_dim MLA_Q_LORA_RANK:mla_q_lora_rank; do
        flag=${var#*:}
        var=${var%%:*}
        [ -n "${!var:-}" ] && DM_FLAGS+=("--$flag" "${!var}")
    done
    case "${DELTANET_SHARE_QK:-}" in
        "") ;;
        true | 1 | yes | on) DM_FLAGS+=(--deltanet_share_qk) ;;
        false | 0 | no | off) DM_FLAGS+=(--deltanet_share_qk=false) ;;
        *) dm_die "DELTANET_SHARE_QK=$DELTANET_SHARE_QK: expected true or false" ;;
    esac
}

# dm_resume_flags OUTPUT_DIR RESUME RESTARTS: appends the --resume flag for the seed's
# resume argument. auto (default): OUTPUT_DIR/latest if there, else fresh; true: latest,
# which must exist; false: a fresh start; a path: that checkpoint. A restarted job
# (RESTARTS > 0) always continues from latest, whatever the first start asked for.
dm_resume_flags() {
    local out=$1 resume=${2:-auto} restarts=${3:-0}
    if [ "$restarts" -gt 0 ]; then
        [ -e "$out/latest" ] || dm_say "restart $restarts finds no $out/latest: starting afresh"
        return
    fi
    case "$resume" in
        auto | "") ;;
        true | yes | 1)
            [ -e "$out/latest" ] || dm_die "resume=true but $out/latest does not exist (nothing to resume; pass auto or false)"
            ;;
        false | no | 0 | none) DM_FLAGS+=(--resume none) ;;
        *)
            [ -r "$resume" ] || dm_die "resume=$resume: no such checkpoint file"
            DM_FLAGS+=(--resume "$resume")
            ;;
    esac
}

# dm_train_flags BATCH BLOCK OUTPUT_DIR RESUME OPTIMIZER RESTARTS: sets DM_FLAGS to the
# whole `deltamla train` flag list: the seed's positional arguments, DELTAMLA_DATA, the
# seed's variables, then DELTAMLA_FLAGS (word-split on purpose, last so that they win).
dm_train_flags() {
    local batch=$1 block=$2 out=$3 resume=$4 opt=$5 restarts=$6
    DM_FLAGS=(--batch_size "$batch" --block_size "$block" --output_dir "$out" --optimizer_type "$opt")
    if [ -n "${DELTAMLA_DATA:-}" ]; then
        dm_check_data "$DELTAMLA_DATA"
        DM_FLAGS+=(--data "$DELTAMLA_DATA")
    elif [[ " ${DELTAMLA_FLAGS:-} " != *" --data"* ]]; then
        dm_die "no training data: set DELTAMLA_DATA to a directory of token shards (deltamla prep), a shard or a text file"
    fi
    dm_check_outdir "$out"
    dm_resume_flags "$out" "$resume" "$restarts"
    dm_seed_flags
    dm_extra_flags
}

# dm_extra_flags: appends DELTAMLA_FLAGS to DM_FLAGS, split into words at blanks (no
# quoting inside it, and no file-name expansion)
dm_extra_flags() {
    local extra=()
    read -r -a extra <<<"${DELTAMLA_FLAGS:-}"
    DM_FLAGS+=("${extra[@]}")
}

# dm_srun_mpi: sets DM_MPI to srun's --mpi plugin: DELTAMLA_SRUN_MPI, else pmix when this
# Slurm lists it (Open MPI starts under it), else pmi2, else none
dm_srun_mpi() {
    if [ -n "${DELTAMLA_SRUN_MPI:-}" ]; then
        DM_MPI=$DELTAMLA_SRUN_MPI
        return
    fi
    local list
    list=$(srun --mpi=list 2>&1)
    if grep -qw pmix <<<"$list"; then
        DM_MPI=pmix
    elif grep -qw pmi2 <<<"$list"; then
        DM_MPI=pmi2
        dm_say "note: this Slurm has no PMIx plugin (srun --mpi=list: $(tr -s '\n\t ' ' ' <<<"$list")); using --mpi=pmi2, which needs an MPI built with Slurm's PMI-2"
    else
        DM_MPI=none
        dm_say "note: this Slurm has neither a PMIx nor a PMI-2 plugin; using --mpi=none, which starts a one-rank job only (ask the site for pmix, or set DELTAMLA_SRUN_MPI)"
    fi
}

# dm_latest_step DIR: the step of DIR/latest (0 when there is none)
dm_latest_step() {
    local l
    l=$(cat "$1/latest" 2>/dev/null) || { echo 0; return; }
    l=${l##*ckpt_}
    l=${l%%.h5}
    echo $((10#${l:-0}))
}

# dm_max_iters DIR: max_iters from the config.json that deltamla wrote in DIR
dm_max_iters() {
    sed -n 's/^ *"max_iters": *\([0-9]*\).*/\1/p' "$1/config.json" 2>/dev/null | head -1
}

# dm_run_forwarding CMD...: runs CMD in the background and waits for it. SIGUSR1 and
# SIGTERM to this shell (Slurm's --signal=B:USR1@120, scancel --batch) are passed on to
# the job's steps, whose ranks then finish their step, save and exit 0. Sets DM_RC to
# CMD's exit status and DM_SIGNAL to the name of the signal received. A signal that came
# before (DM_SIGNAL already set) means CMD does not start at all (DM_RC 0).
dm_run_forwarding() {
    DM_RC=0
    [ -z "${DM_SIGNAL:-}" ] || return 0
    "$@" &
    local pid=$!
    trap 'dm_forward USR1 '"$pid" USR1
    trap 'dm_forward TERM '"$pid" TERM
    while :; do
        wait "$pid"
        DM_RC=$?
        # a trapped signal ends `wait` early with 128+n while the step still runs
        [ "$DM_RC" -gt 128 ] && kill -0 "$pid" 2>/dev/null && continue
        break
    done
    trap - USR1 TERM
}
dm_forward() {
    DM_SIGNAL=$1
    dm_say "got SIG$1: passing it to the ranks of job ${SLURM_JOB_ID:-}; they save a checkpoint and stop"
    # scancel reaches every task of every step of the job on all its nodes, not the batch shell
    if [ -n "${SLURM_JOB_ID:-}" ] && scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null; then
        return
    fi
    kill -s "$1" "$2" 2>/dev/null
}

# dm_train_job SCRIPT [BATCH [BLOCK [OUTPUT_DIR [RESUME [OPTIMIZER]]]]]: the body of
# train.sbatch and train-multinode.sbatch: one rank per task, resume from latest, and on
# SIGUSR1 a checkpoint and a requeue of this job (at most DELTAMLA_MAX_RESTARTS times).
dm_train_job() {
    local script=$1
    shift
    local batch=${1:-8} block=${2:-2048} out=${3:-out} resume=${4:-auto} opt=${5:-muon}
    [ $# -le 5 ] || dm_die "$script takes at most 5 arguments (batch_size block_size output_dir resume optimizer), got $#; put other flags in DELTAMLA_FLAGS"
    dm_require_slurm "$script"
    # a signal during the checks below is remembered and acted on instead of starting
    DM_SIGNAL=""
    trap 'DM_SIGNAL=USR1' USR1
    trap 'DM_SIGNAL=TERM' TERM
    local restarts=${SLURM_RESTART_COUNT:-0} max_restarts=${DELTAMLA_MAX_RESTARTS:-20}
    dm_find_bin
    dm_train_flags "$batch" "$block" "$out" "$resume" "$opt" "$restarts"
    dm_srun_mpi

    local nodes=${SLURM_JOB_NUM_NODES:-1} ntasks=${SLURM_NTASKS:-1} cpt=${SLURM_CPUS_PER_TASK:-1}
    # each rank's OpenMP threads fill its own CPUs, not the submitting shell's setting
    # (--threads in DELTAMLA_FLAGS overrides)
    export OMP_NUM_THREADS=$cpt
    dm_say "job $SLURM_JOB_ID start $((restarts + 1)) (restarts so far $restarts of at most $max_restarts) on $nodes node(s): $(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | tr '\n' ' ')"
    dm_say "$ntasks rank(s), ${SLURM_GPUS_ON_NODE:-0} GPU(s) per node, $cpt CPU(s) and OMP_NUM_THREADS=$OMP_NUM_THREADS per rank, srun --mpi=$DM_MPI"
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "${SLURM_NTASKS_PER_NODE%%(*}" != "$SLURM_GPUS_ON_NODE" ]; then
        dm_say "warning: ${SLURM_NTASKS_PER_NODE%%(*} ranks per node but $SLURM_GPUS_ON_NODE GPUs per node; deltamla runs one rank per GPU (set --ntasks-per-node to the GPU count)"
    fi
    dm_say "$DM_BIN train ${DM_FLAGS[*]}"

    # --kill-on-bad-exit: one rank that dies ends the step instead of leaving the others hanging
    dm_run_forwarding srun --mpi="$DM_MPI" --kill-on-bad-exit=1 --cpus-per-task="$cpt" "$DM_BIN" train "${DM_FLAGS[@]}"
    if [ "$DM_RC" -ne 0 ]; then
        dm_say "deltamla train failed with status $DM_RC (its message is above); not requeued"
        exit "$DM_RC"
    fi
    [ -n "$DM_SIGNAL" ] || { dm_say "training finished"; return 0; }

    local step max
    step=$(dm_latest_step "$out")
    max=$(dm_max_iters "$out")
    if [ -n "$max" ] && [ "$step" -ge "$max" ]; then
        dm_say "SIG$DM_SIGNAL came as the run ended: all $max steps are done, nothing to requeue"
    elif [ "$DM_SIGNAL" != USR1 ]; then
        dm_say "stopped by SIG$DM_SIGNAL at step $step (cancelled or preempted): not requeued by this script"
    elif [ "$restarts" -ge "$max_restarts" ]; then
        dm_say "stopped at step $step; this job has been restarted $restarts times, the most DELTAMLA_MAX_RESTARTS=$max_restarts allows: not requeued (submit the same command again to continue from $out/latest)"
    else
        dm_say "checkpoint at step $step saved in $out; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID" || dm_die "scontrol requeue $SLURM_JOB_ID failed (is JobRequeue disabled here? submit the same command again to continue from $out/latest)"
    fi
    return 0
}
