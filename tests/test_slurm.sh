#!/usr/bin/env bash
# Slurm tests: the job scripts of jobscripts/ under a real one-node Slurm that this test
# starts itself (tests/tools/local_slurm.sh: munged, slurmctld and slurmd from Debian's
# packages, in a temporary directory, stopped at the end whatever happens), on the CPU
# backend with the tiny model:
#   prep.sbatch on 2 ranks (srun --mpi=pmix) gives the shards of a one-process prep;
#   train-multinode.sbatch from the installed tree (make install, module load) trains
#   straight through; train.sbatch from the source tree is sent SIGUSR1 mid-run as Slurm's
#   --signal=B:USR1@120 does: it checkpoints, requeues itself, resumes from latest, and
#   ends with the straight run's losses bit for bit; the restart cap stops a requeue; the
#   seed's variables reach deltamla's flags; a bad flag and missing data fail the job with
#   the message in its log; scaling.sbatch writes its CSV and PNG.
# Prints "ok - ..." / "not ok - ..." lines; without root or without the Slurm packages it
# prints one "ok - # SKIP" line and exits 0. About a minute on two cores.
set -u
cd "$(dirname "$0")/.." || exit 1
# Ranks (tasks) of the training and scaling jobs (TEST_TRAIN_RANKS=1 in the environment
# runs them on one).
TEST_TRAIN_RANKS=${TEST_TRAIN_RANKS:-2}
T=$TEST_TRAIN_RANKS

ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }
skip() {
    echo "ok - # SKIP slurm: $1"
    exit 0
}
[ "$(id -u)" -eq 0 ] || skip "needs root (munged and slurmd run as root here)"
for c in munged mungekey slurmctld slurmd sbatch srun scontrol squeue scancel; do
    command -v "$c" >/dev/null || skip "$c is not installed (apt-get install slurm-wlm munge)"
done
[ -x bin/deltamla ] || { nok "bin/deltamla is not built (make)"; exit 1; }
text=${DELTAMLA_TEST_TEXT:-../shared/data/tinyshakespeare.txt}
[ -r "$text" ] || { nok "slurm: $text is missing (the test reads ../shared/data/tinyshakespeare.txt)"; exit 1; }
text=$(cd "$(dirname "$text")" && pwd)/$(basename "$text")

tmp=$(mktemp -d)
cleanup() {
    tests/tools/local_slurm.sh stop "$tmp/slurm"
    rm -rf "$tmp"
}
trap cleanup EXIT
t_start=$SECONDS

# ---- the cluster ----
if ! start=$(tests/tools/local_slurm.sh start "$tmp/slurm" 2>&1); then
    nok "a one-node Slurm starts" "$start"
    exit 1
fi
eval "$(tail -n 1 <<<"$start")"
ok "a one-node Slurm ($(sinfo --version)) is up in $((SECONDS - t_start)) s: node $(sinfo -h -N -o '%N %c CPUs %G %t')"
mpis=$(srun --mpi=list 2>&1 | tr -s '\n\t ' ' ')
if grep -qw pmix <<<"$mpis"; then want_mpi=pmix; else want_mpi=""; fi
echo "# srun --mpi=list: $mpis"

jstate() { scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
jfield() { scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
# wait_job ID SECONDS: until the job has ended (any final state); 1 on timeout
wait_job() {
    local s
    for _ in $(seq 1 $(($2 * 5))); do
        s=$(jstate "$1")
        case "$s" in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) return 0 ;; esac
        sleep 0.2
    done
    return 1
}
# wait_steps FILE N SECONDS: until FILE holds N loss records
wait_steps() {
    for _ in $(seq 1 $(($3 * 10))); do
        local n
        n=$(grep -c '"loss"' "$1" 2>/dev/null)
        [ "${n:-0}" -ge "$2" ] && return 0
        sleep 0.1
    done
    return 1
}
# every per-step record of a metrics file without the timing: "step loss zloss grad_norm"
steps() { python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "loss" in r: print(r["step"], repr(r["loss"]), repr(r["zloss"]), repr(r["grad_norm"]))' "$1"; }
has() { grep -qF -e "$2" "$1"; }

# ---- prep.sbatch on 2 ranks ----
unset OMP_NUM_THREADS
id=$(sbatch --parsable --ntasks=2 -o "$tmp/prep.out" jobscripts/prep.sbatch "$text" "$tmp/data" 2>&1)
bin/deltamla prep --input "$text" --output "$tmp/data1" >/dev/null 2>&1
if wait_job "$id" 60 && [ "$(jstate "$id")" = COMPLETED ] && has "$tmp/prep.out" "on 2 ranks" &&
    [ -n "$(ls "$tmp"/data/shard_*.h5 2>/dev/null)" ]; then
    same=yes
    for f in "$tmp"/data1/shard_*.h5; do cmp -s "$f" "$tmp/data/$(basename "$f")" || same=no; done
    [ "$same" = yes ] && ok "prep.sbatch on 2 ranks (srun --mpi=${want_mpi:-none}) writes the shards of a one-process prep, byte for byte: $(grep '^prep:' "$tmp/prep.out")" ||
        nok "prep.sbatch shards differ from a one-process prep"
else
    nok "prep.sbatch" "job $id $(jstate "$id"): $(tail -n 5 "$tmp/prep.out" 2>/dev/null)"
    exit 1
fi

# ---- install, and the module (Lmod when present) ----
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s install PREFIX="$tmp/prefix" >"$tmp/install.log" 2>&1 ||
    { nok "make install" "$(tail -n 3 "$tmp/install.log")"; exit 1; }
load_module() { # sets PATH, DELTAMLA_HOME, DELTAMLA_JOBSCRIPTS as `module load deltamla` does
    if [ -r /usr/share/lmod/lmod/init/bash ]; then
        set +u
        . /usr/share/lmod/lmod/init/bash
        module use "$tmp/prefix/modulefiles"
        module load deltamla
        set -u
    else
        export DELTAMLA_HOME=$tmp/prefix DELTAMLA_JOBSCRIPTS=$tmp/prefix/share/deltamla/jobscripts PATH=$tmp/prefix/bin:$PATH
    fi
}

# ---- training jobs, side by side ----
tflags="--size tiny --device cpu --max_iters 30 --log_interval 1 --learning_rate 2e-3 --warmup_iters 2 --checkpoint_interval 0"
res=(--nodes=1 --ntasks-per-node="$T" --gpus-per-node="$T" --cpus-per-task=1)
export DELTAMLA_DATA=$tmp/data
# A: straight through, the multi-node script from the installed tree, the module loaded
# (--oversubscribe undoes its --exclusive so the other jobs share the node)
A=$( (load_module && DELTAMLA_FLAGS=$tflags sbatch --parsable "${res[@]}" --oversubscribe -o "$tmp/A.out" \
    "$DELTAMLA_JOBSCRIPTS/train-multinode.sbatch" 4 64 "$tmp/runA") 2>&1)
# B: the same run, from the source tree, to be preempted
B=$(DELTAMLA_FLAGS=$tflags sbatch --parsable "${res[@]}" -o "$tmp/B.out" jobscripts/train.sbatch 4 64 "$tmp/runB" 2>&1)
# C: a bad flag;  E: missing data
C=$(DELTAMLA_FLAGS="$tflags --bogus_flag 1" sbatch --parsable "${res[@]}" -o "$tmp/C.out" jobscripts/train.sbatch 4 64 "$tmp/runC" 2>&1)
E=$(DELTAMLA_DATA=$tmp/no_such_data DELTAMLA_FLAGS=$tflags sbatch --parsable "${res[@]}" -o "$tmp/E.out" jobscripts/train.sbatch 4 64 "$tmp/runE" 2>&1)
# D: the seed's variables, no restarts allowed, adamw from the positional argument
D=$(DELTAMLA_MAX_RESTARTS=0 N_EXPERTS=2 N_ACTIVATED=2 MLA_Q_LORA_RANK=16 DELTANET_LATENT_DIM=32 DELTANET_SHARE_QK=true \
    DELTAMLA_FLAGS=$tflags sbatch --parsable "${res[@]}" -o "$tmp/D.out" jobscripts/train.sbatch 4 64 "$tmp/runD" auto adamw 2>&1)
for j in "$A" "$B" "$C" "$D" "$E"; do
    [[ "$j" =~ ^[0-9]+$ ]] || { nok "sbatch refused a job" "$j"; exit 1; }
done
ok "sbatch accepts the job scripts with their #SBATCH lines (jobs $A $B $C $D $E)"

# S: the scaling sweep, next to them
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check matplotlib >/dev/null 2>&1
S=$(SCALING_STEPS=8 SCALING_SKIP=2 SCALING_BATCH=2 SCALING_BLOCK=64 DELTAMLA_FLAGS="--size tiny --device cpu" \
    sbatch --parsable "${res[@]}" --oversubscribe -o "$tmp/S.out" jobscripts/scaling.sbatch "$tmp/scaling" 2>&1)

# the preemption: SIGUSR1 to the batch shell, as --signal=B:USR1@120 sends it
if wait_steps "$tmp/runB/metrics.jsonl" 5 60; then
    scancel --signal=USR1 --batch "$B"
else
    nok "job B did not log 5 steps in 60 s" "$(jstate "$B") $(tail -n 3 "$tmp/B.out" 2>/dev/null)"
fi
wait_steps "$tmp/runD/metrics.jsonl" 3 60 && scancel --signal=USR1 --batch "$D"

for j in "$A" "$B" "$C" "$D" "$E" "$S"; do
    wait_job "$j" 150 || nok "job $j did not end in 150 s" "$(jstate "$j")"
done
t_jobs=$((SECONDS - t_start))

# A: straight run from the installed tree
if [ "$(jstate "$A")" = COMPLETED ] && [ "$(steps "$tmp/runA/metrics.jsonl" 2>/dev/null | grep -c '')" -eq 30 ] &&
    has "$tmp/A.out" "$tmp/prefix/bin/deltamla train" && has "$tmp/A.out" "training finished"; then
    ok "train-multinode.sbatch from the installed tree (module load deltamla) trains 30 steps with $T rank(s)"
else
    nok "straight run (job $A)" "$(jstate "$A") $(tail -n 4 "$tmp/A.out" 2>/dev/null)"
fi
if [ -n "$want_mpi" ]; then
    has "$tmp/A.out" "srun --mpi=pmix" && ok "the ranks start with srun --mpi=pmix" || nok "srun --mpi=pmix" "$(grep 'srun --mpi' "$tmp/A.out")"
else
    has "$tmp/A.out" "note: this Slurm has no PMIx plugin" && ok "no pmix in this Slurm: the job says so and falls back" ||
        nok "pmix fallback message" "$(grep 'srun --mpi' "$tmp/A.out")"
fi

# B: preempted, requeued, resumed
k=$(sed -n 's/.*stopped by SIGUSR1 after \([0-9]*\) of 30 steps.*/\1/p' "$tmp/B.out" | head -n 1)
if [ -n "$k" ] && has "$tmp/B.out" "got SIGUSR1: passing it to the ranks" &&
    has "$tmp/B.out" "checkpoint at step $k saved in $tmp/runB; requeueing job $B (restart 1)"; then
    ok "SIGUSR1 to the batch script: the ranks finish step $((k - 1)), save ckpt_$(printf %08d "$k").h5, exit 0, and the script requeues the job"
else
    nok "signal and requeue" "$(grep -E 'deltamla' "$tmp/B.out" | tail -n 5)"
fi
if [ "$(jstate "$B")" = COMPLETED ] && [ "$(jfield "$B" Restarts)" = 1 ] && has "$tmp/B.out" "job $B start 2 (restarts so far 1" &&
    has "$tmp/B.out" "resumed from $tmp/runB/ckpt_$(printf %08d "${k:-0}").h5: step $k"; then
    ok "the requeued job starts again (Restarts=1), resumes from latest at step $k and completes"
else
    nok "requeued start" "$(jstate "$B") Restarts=$(jfield "$B" Restarts) $(tail -n 4 "$tmp/B.out" 2>/dev/null)"
fi
want=$(steps "$tmp/runA/metrics.jsonl" 2>/dev/null)
got=$(steps "$tmp/runB/metrics.jsonl" 2>/dev/null)
if [ -n "$want" ] && [ "$want" == "$got" ]; then
    ok "the preempted and resumed job logs the straight job's 30 losses, z-losses and grad norms bit for bit"
else
    nok "preempted losses" "$(diff <(echo "$want") <(echo "$got") | head -n 4 | tr '\n' ' ')"
fi
n=$(grep -c '"resumed_from"' "$tmp/runB/metrics.jsonl" 2>/dev/null)
[ "${n:-0}" -eq 1 ] && ok "metrics.jsonl of the preempted job records one resume" || nok "one resume record" "${n:-no metrics.jsonl}"

# C: bad flag;  E: missing data
if [ "$(jstate "$C")" = FAILED ] && [ "$(jfield "$C" Restarts)" = 0 ] &&
    has "$tmp/C.out" "deltamla: error: unknown flag --bogus_flag" && has "$tmp/C.out" "not requeued"; then
    ok "a bad flag fails the job (FAILED, exit $(jfield "$C" ExitCode)) with deltamla's message in its log: $(grep -m1 'deltamla: error' "$tmp/C.out")"
else
    nok "bad flag job" "$(jstate "$C") $(tail -n 3 "$tmp/C.out" 2>/dev/null)"
fi
if [ "$(jstate "$E")" = FAILED ] && has "$tmp/E.out" "deltamla job: error: the training data $tmp/no_such_data does not exist"; then
    ok "missing data fails the job before srun: $(grep -m1 'error' "$tmp/E.out")"
else
    nok "missing data job" "$(jstate "$E") $(tail -n 3 "$tmp/E.out" 2>/dev/null)"
fi

# D: restart cap and the seed's variables
kd=$(sed -n 's/.*stopped by SIGUSR1 after \([0-9]*\) of 30 steps.*/\1/p' "$tmp/D.out" | head -n 1)
if [ "$(jstate "$D")" = COMPLETED ] && [ "$(jfield "$D" Restarts)" = 0 ] && [ -n "$kd" ] &&
    has "$tmp/D.out" "the most DELTAMLA_MAX_RESTARTS=0 allows: not requeued"; then
    ok "DELTAMLA_MAX_RESTARTS=0: the signalled job saves at step $kd and is not requeued"
else
    nok "restart cap" "$(jstate "$D") Restarts=$(jfield "$D" Restarts) $(grep deltamla "$tmp/D.out" | tail -n 3)"
fi
cfg=$(python3 -c 'import json, sys
c = json.load(open(sys.argv[1]))
print(c["n_experts"], c["n_activated"], c["mla_q_lora_rank"], c["deltanet_latent_dim"], c["deltanet_share_qk"], c["optimizer_type"])' \
    "$tmp/runD/config.json" 2>&1)
[ "$cfg" = "2 2 16 32 True adamw" ] &&
    ok "N_EXPERTS, N_ACTIVATED, MLA_Q_LORA_RANK, DELTANET_LATENT_DIM, DELTANET_SHARE_QK and the optimizer argument reach the run's config" ||
    nok "seed variables" "$cfg"

# S: the scaling sweep
csv=$tmp/scaling/scaling.csv
rows=$(tail -n +2 "$csv" 2>/dev/null | cut -d, -f1,2,3,4,5,6 | tr '\n' ' ')
want_rows=""
for mode in weak strong; do
    for ((r = 1; r <= T; r *= 2)); do
        if [ $mode = weak ]; then want_rows+="weak,1,$r,2,1,$((2 * r)) "; else want_rows+="strong,1,$r,2,$((T / r)),$((2 * T)) "; fi
    done
done
if [ "$(jstate "$S")" = COMPLETED ] && [ "$rows" = "$want_rows" ] && head -n 1 "$csv" | grep -q '^mode,nodes,ranks,batch_per_rank,accumulation,global_batch,block_size,tokens_per_s,tokens_per_s_per_rank,efficiency$' &&
    awk -F, 'NR > 1 && !($8 > 0 && $10 > 0) { bad = 1 } END { exit bad }' "$csv"; then
    ok "scaling.sbatch writes its CSV: $(tail -n +2 "$csv" | tr '\n' ' ')"
else
    nok "scaling CSV (job $S $(jstate "$S"))" "rows [$rows] want [$want_rows] $(tail -n 4 "$tmp/S.out" 2>/dev/null)"
fi
if python3 -c 'import matplotlib' 2>/dev/null; then
    if [ "$(head -c 8 "$tmp/scaling/scaling.png" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; then
        ok "scaling.sbatch draws scaling.png ($(stat -c %s "$tmp/scaling/scaling.png") bytes)"
    else
        nok "scaling.png" "$(grep -i plot "$tmp/S.out")"
    fi
else
    has "$tmp/S.out" "matplotlib is not installed" && ok "# SKIP scaling.png: matplotlib is not installable here; the job says so" ||
        nok "no matplotlib message" "$(tail -n 3 "$tmp/S.out")"
fi
echo "# jobs done $t_jobs s after the start; whole test $((SECONDS - t_start)) s"
exit 0
