#!/usr/bin/env bash
# Install, modulefile and job-script tests that need no Slurm:
#   make install: the tree, the version, the prefix and the prerequisite module names in
#   the modulefiles (from LOADEDMODULES or MODULE_*=), DESTDIR staging;
#   the Lua modulefile under Debian's Lmod and the Tcl twin under Lmod and under the
#   Environment Modules modulecmd.tcl: load, `deltamla --version`, a prerequisite the site
#   has is loaded (and unloaded with it), one it lacks is skipped;
#   jobscripts/train.sh: GPU detection through nvidia-smi -L (a stand-in on PATH), the seed
#   launcher's arguments and variables, resume modes, every missing thing named;
#   the sbatch scripts outside a job; plot_scaling.py's PNG and its refusals.
# Prints "ok - ..." / "not ok - ..." lines; the module cases skip with a "# SKIP" line
# where Lmod or Environment Modules is not there.
set -u
cd "$(dirname "$0")/.." || exit 1
# Ranks for the multi-GPU case of train.sh (mpirun -np 2 on the CPU; TEST_TRAIN_RANKS=1 in
# the environment only shows the command).
TEST_TRAIN_RANKS=${TEST_TRAIN_RANKS:-2}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
unset DELTAMLA_HOME DELTAMLA_JOBSCRIPTS DELTAMLA_BIN DELTAMLA_DATA DELTAMLA_FLAGS LATENT_RATIO N_EXPERTS N_ACTIVATED \
    DELTANET_LATENT_DIM DELTANET_SHARE_QK MLA_Q_LORA_RANK SLURM_JOB_ID LOADEDMODULES MODULEPATH
ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }
one_line() { [ "$(printf '%s' "$1" | grep -c '')" -eq 1 ]; }
[ -x bin/deltamla ] || { nok "bin/deltamla is not built (make)"; exit 1; }
version=$(sed -n 's/^#define DELTAMLA_VERSION "\(.*\)"/\1/p' src/version.h)
mk() { env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s "$@"; }

# ---- make install ----
P=$tmp/prefix
mk install PREFIX="$P" >"$tmp/install.log" 2>&1 || { nok "make install" "$(tail -n 3 "$tmp/install.log")"; exit 1; }
missing=""
for f in bin/deltamla share/deltamla/jobscripts/{train.sbatch,train-multinode.sbatch,prep.sbatch,scaling.sbatch,train.sh,plot_scaling.py,lib.sh,README.md} \
    share/deltamla/doc/README.md share/deltamla/doc/io/SHARDS.md share/deltamla/doc/io/CKPT_TOOL.md \
    "modulefiles/deltamla/$version.lua" "modulefiles/deltamla/$version"; do
    [ -e "$P/$f" ] || missing+=" $f"
done
[ -z "$missing" ] && ok "make install PREFIX=... puts the binary, job scripts, docs and both modulefiles (deltamla/$version.lua and deltamla/$version) in place" ||
    nok "installed files missing" "$missing"
[ "$("$P/bin/deltamla" --version)" = "deltamla $version" ] && ok "the installed binary says deltamla $version, the version of src/version.h" ||
    nok "installed version" "$("$P/bin/deltamla" --version)"
[ -x "$P/share/deltamla/jobscripts/train.sbatch" ] && [ -x "$P/share/deltamla/jobscripts/train.sh" ] && ok "installed job scripts are executable" ||
    nok "job scripts not executable"
if grep -q "local prefix  = \"$P\"" "$P/modulefiles/deltamla/$version.lua" && grep -q "^set prefix  \"$P\"" "$P/modulefiles/deltamla/$version" &&
    ! grep -q '@[A-Z_]*@' "$P/modulefiles/deltamla/$version.lua" "$P/modulefiles/deltamla/$version" &&
    grep -q "^local mpi_module  = \"openmpi\"" "$P/modulefiles/deltamla/$version.lua" && grep -q '^#%Module' "$P/modulefiles/deltamla/$version"; then
    ok "the modulefiles carry the prefix, the version and the default prerequisite names (openmpi, hdf5)"
else
    nok "modulefile substitution" "$(grep -n -E 'prefix|module  =|@' "$P/modulefiles/deltamla/$version.lua" | head -n 5)"
fi
S=$tmp/stage
LOADEDMODULES="gcc/12:openmpi/4.1.6:cuda/12.4:hdf5/1.14.3-mpi" mk install DESTDIR="$S" PREFIX=/opt/deltamla/$version >/dev/null 2>&1
lua=$S/opt/deltamla/$version/modulefiles/deltamla/$version.lua
if [ -x "$S/opt/deltamla/$version/bin/deltamla" ] && grep -q "local prefix  = \"/opt/deltamla/$version\"" "$lua" &&
    grep -q 'local mpi_module  = "openmpi/4.1.6"' "$lua" && grep -q 'local hdf5_module = "hdf5/1.14.3-mpi"' "$lua" &&
    grep -q -E 'local cuda_module = "(cuda/12.4|)"' "$lua"; then
    ok "DESTDIR stages the tree; the modulefile records the MPI, CUDA and HDF5 modules loaded at install: $(grep -E '^local (mpi|cuda|hdf5)_module' "$lua" | tr -s ' ' | tr '\n' ' ')"
else
    nok "DESTDIR / LOADEDMODULES" "$(grep -E '^local' "$lua" 2>&1 | head -n 4 | tr '\n' ' ')"
fi
out=$(mk install PREFIX=relative/dir 2>&1)
[ $? -ne 0 ] && grep -q "PREFIX must be an absolute path" <<<"$out" && ok "a relative PREFIX is refused" || nok "relative PREFIX" "$out"

# ---- modules ----
# a site module tree with an openmpi module (sets a variable) and no hdf5 or cuda module
mkdir -p "$tmp/site/openmpi" "$tmp/tclonly/deltamla"
printf '#%%Module1.0\nsetenv SITE_OPENMPI_LOADED yes\n' >"$tmp/site/openmpi/4.1"
cp "$P/modulefiles/deltamla/$version" "$tmp/tclonly/deltamla/"
# module_case NAME INIT MODULEPATH: loads deltamla with the `module` that INIT defines
module_case() {
    local name=$1 init=$2 mpath=$3 out
    out=$(env -i HOME="$HOME" PATH=/usr/bin:/bin TERM=dumb bash -c '
        '"$init"'
        module use '"$mpath"'
        module load deltamla || exit 3
        echo "version=$(deltamla --version)"
        echo "home=$DELTAMLA_HOME jobscripts=$DELTAMLA_JOBSCRIPTS which=$(command -v deltamla)"
        echo "before-site=${SITE_OPENMPI_LOADED:-no}"
        module unload deltamla
        echo "after-unload=${DELTAMLA_HOME:-unset}"
        module use '"$tmp/site"'
        module load deltamla || exit 4
        echo "with-site=${SITE_OPENMPI_LOADED:-no}"
        module unload deltamla
        echo "site-after-unload=${SITE_OPENMPI_LOADED:-unset}"
        module whatis deltamla 2>&1 | grep -q "Version: '"$version"'" && echo whatis=ok
        module help deltamla 2>&1 | grep -q "DELTAMLA_JOBSCRIPTS" && echo help=ok
    ' 2>&1)
    local rc=$?
    if [ $rc -eq 0 ] && grep -qx "version=deltamla $version" <<<"$out" &&
        grep -qx "home=$P jobscripts=$P/share/deltamla/jobscripts which=$P/bin/deltamla" <<<"$out" &&
        grep -qx "before-site=no" <<<"$out" && grep -qx "after-unload=unset" <<<"$out" && grep -qx "with-site=yes" <<<"$out" &&
        grep -qx "site-after-unload=unset" <<<"$out" && grep -qx "whatis=ok" <<<"$out" && grep -qx "help=ok" <<<"$out"; then
        ok "$name: module load deltamla; deltamla --version says $version; PATH, DELTAMLA_HOME, DELTAMLA_JOBSCRIPTS set; a missing prerequisite is skipped, the site's openmpi is loaded and unloaded with it; whatis, help"
    else
        nok "$name" "rc=$rc $(tr '\n' ' ' <<<"$out" | cut -c1-600)"
    fi
}
lmod_init=/usr/share/lmod/lmod/init/bash
if [ -r "$lmod_init" ]; then
    module_case "Lmod $(bash -c ". $lmod_init; module --version 2>&1" | grep -o 'Version [0-9.]*' | head -n 1), Lua modulefile" ". $lmod_init" "$P/modulefiles"
    module_case "Lmod, the Tcl modulefile" ". $lmod_init" "$tmp/tclonly"
else
    ok "# SKIP Lmod is not installed (apt-get install lmod)"
fi
modulecmd=""
for c in "${ENVIRONMENT_MODULES_CMD:-}" /usr/share/modules/libexec/modulecmd.tcl /usr/lib/*/modulecmd.tcl \
    /opt/environment-modules/usr/lib/*/modulecmd.tcl; do
    [ -n "$c" ] && [ -r "$c" ] && command -v tclsh >/dev/null && { modulecmd=$c; break; }
done
if [ -n "$modulecmd" ]; then
    module_case "Environment Modules $(tclsh "$modulecmd" bash --version 2>&1 | grep -o '[0-9][0-9.]*' | head -n 1) ($modulecmd), the Tcl modulefile beside the Lua one" \
        "module() { eval \"\$(tclsh $modulecmd bash \"\$@\")\"; }" "$P/modulefiles"
else
    ok "# SKIP Environment Modules' modulecmd.tcl not found (Debian's environment-modules conflicts with lmod; .ci/run unpacks it in /opt/environment-modules)"
fi

# ---- jobscripts/train.sh ----
head -c 60000 "${DELTAMLA_TEST_TEXT:-../shared/data/tinyshakespeare.txt}" >"$tmp/text.txt" 2>/dev/null ||
    for i in $(seq 1 400); do echo "It is a truth universally acknowledged, that a single man $i"; done >"$tmp/text.txt"
flags="--size tiny --device cpu --max_iters 6 --log_interval 1 --learning_rate 2e-3 --warmup_iters 2"
# nvidia-smi stand-ins: N GPUs listed as the real one lists them, or a driver failure
mkdir -p "$tmp/gpus0" "$tmp/gpus1" "$tmp/gpus2"
printf '#!/bin/sh\necho "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."\nexit 9\n' >"$tmp/gpus0/nvidia-smi"
printf '#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n' >"$tmp/gpus1/nvidia-smi"
printf '#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\necho "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"\n' >"$tmp/gpus2/nvidia-smi"
chmod +x "$tmp"/gpus*/nvidia-smi
ts() { # gpus-dir command...: runs the command with the nvidia-smi stand-in of gpus-dir
    # first on PATH and DELTAMLA_DATA and DELTAMLA_FLAGS set (`env VAR=...` after it overrides)
    local g=$1
    shift
    PATH=$tmp/$g:$PATH DELTAMLA_DATA=$tmp/text.txt DELTAMLA_FLAGS=$flags "$@"
}
cfg() { python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); print(" ".join(str(c[k]) for k in sys.argv[2:]))' "$@"; }

out=$(ts gpus0 jobscripts/train.sh 2 32 "$tmp/w1" 2>&1)
rc=$?
if [ $rc -eq 0 ] && grep -q "no GPU found (nvidia-smi -L): one process on the CPU" <<<"$out" &&
    grep -q "deltamla job: $PWD/bin/deltamla train --batch_size 2 --block_size 32 --output_dir $tmp/w1 --optimizer_type muon" <<<"$out" &&
    [ "$(grep -c '"loss"' "$tmp/w1/metrics.jsonl")" -eq 6 ] && [ "$(cfg "$tmp/w1/config.json" batch_size block_size)" = "2 32" ]; then
    ok "train.sh without a GPU: one CPU process, the seed's batch and block size, the source tree's binary, 6 steps"
else
    nok "train.sh on the CPU" "rc=$rc $(tail -n 3 <<<"$out")"
fi
out=$(ts gpus0 env DELTAMLA_FLAGS="${flags/--max_iters 6/--max_iters 9}" jobscripts/train.sh 2 32 "$tmp/w1" 2>&1)
grep -q "resumed from $tmp/w1/ckpt_00000006.h5" <<<"$out" && [ "$(grep -c '"loss"' "$tmp/w1/metrics.jsonl")" -eq 9 ] &&
    ok "train.sh again with resume auto (the default) resumes from output_dir/latest" || nok "resume auto" "$(tail -n 3 <<<"$out")"
out=$(ts gpus0 jobscripts/train.sh 2 32 "$tmp/w1" false 2>&1)
grep -q -- "--resume none" <<<"$out" && ! grep -q "resumed from" <<<"$out" && [ "$(grep -c '"loss"' "$tmp/w1/metrics.jsonl")" -eq 6 ] &&
    ok "resume false starts afresh (--resume none)" || nok "resume false" "$(tail -n 3 <<<"$out")"
err=$(ts gpus0 jobscripts/train.sh 2 32 "$tmp/w_empty" true 2>&1 >/dev/null)
[ $? -eq 1 ] && one_line "$err" && grep -q "resume=true but $tmp/w_empty/latest does not exist" <<<"$err" &&
    ok "resume true with nothing to resume: $err" || nok "resume true" "$err"
out=$(ts gpus0 jobscripts/train.sh 2 32 "$tmp/w2" "$tmp/w1/ckpt_00000006.h5" adamw 2>&1)
grep -q "trained with --optimizer_type muon but this run has adamw" <<<"$out" &&
    ok "resume FILE and the optimizer argument reach deltamla (which refuses a muon checkpoint for adamw)" || nok "resume file" "$(tail -n 2 <<<"$out")"

out=$(ts gpus1 env LATENT_RATIO=2 N_EXPERTS=2 N_ACTIVATED=1 DELTANET_LATENT_DIM=16 DELTANET_SHARE_QK=yes MLA_Q_LORA_RANK=8 \
    jobscripts/train.sh 2 32 "$tmp/w3" auto adamw you/your-repo 2>&1)
c=$(cfg "$tmp/w3/config.json" latent_ratio n_experts n_activated deltanet_latent_dim deltanet_share_qk mla_q_lora_rank optimizer_type 2>&1)
if [ "$c" = "2 2 1 16 True 8 adamw" ] && grep -q "1 GPU: one process" <<<"$out" && grep -q "Hugging Face repository 'you/your-repo' is not used" <<<"$out"; then
    ok "the seed's LATENT_RATIO, N_EXPERTS, N_ACTIVATED, DELTANET_LATENT_DIM, DELTANET_SHARE_QK, MLA_Q_LORA_RANK become flags; nvidia-smi -L with 1 GPU: one process; the HF argument is noted"
else
    nok "seed variables" "$c $(tail -n 3 <<<"$out")"
fi
if [ "$TEST_TRAIN_RANKS" -ge 2 ]; then
    out=$(ts gpus2 jobscripts/train.sh 2 32 "$tmp/w4" 2>&1)
    [ $? -eq 0 ] && grep -q "2 GPUs: mpirun -np 2" <<<"$out" && [ "$(grep -c '"loss"' "$tmp/w4/metrics.jsonl")" -eq 6 ] &&
        ok "nvidia-smi -L with 2 GPUs: train.sh starts 2 ranks with mpirun and trains" || nok "train.sh on 2 ranks" "$(tail -n 3 <<<"$out")"
else
    out=$(ts gpus2 env MPIRUN=echo jobscripts/train.sh 2 32 "$tmp/w4" 2>&1)
    grep -q "^-np 2 .*$PWD/bin/deltamla train --batch_size 2" <<<"$out" &&
        ok "nvidia-smi -L with 2 GPUs: train.sh launches mpirun -np 2 (shown with MPIRUN=echo; TEST_TRAIN_RANKS=2 trains for real)" ||
        nok "2-GPU launch line" "$(tail -n 2 <<<"$out")"
fi

# what is missing is named, on one line, exit 1
expect_error() { # what, expected text, command...
    local what=$1 want=$2 err rc
    shift 2
    err=$("$@" 2>&1 >/dev/null)
    rc=$?
    if [ $rc -eq 1 ] && one_line "$err" && grep -qF -e "$want" <<<"$err"; then ok "$what: $err"; else nok "$what" "rc=$rc [$err]"; fi
}
expect_error "no data" "no training data: set DELTAMLA_DATA" ts gpus0 env DELTAMLA_DATA= jobscripts/train.sh 2 32 "$tmp/e1"
expect_error "data missing" "the training data $tmp/nothing does not exist" ts gpus0 env DELTAMLA_DATA="$tmp/nothing" jobscripts/train.sh 2 32 "$tmp/e1"
mkdir -p "$tmp/emptydata"
expect_error "data directory without shards" "holds no token shards" ts gpus0 env DELTAMLA_DATA="$tmp/emptydata" jobscripts/train.sh 2 32 "$tmp/e1"
: >"$tmp/afile"
expect_error "output directory not creatable" "cannot create the output directory $tmp/afile/out" ts gpus0 jobscripts/train.sh 2 32 "$tmp/afile/out"
expect_error "binary missing" "DELTAMLA_BIN=$tmp/nothing is not an executable file" ts gpus0 env DELTAMLA_BIN="$tmp/nothing" jobscripts/train.sh
expect_error "bad DELTANET_SHARE_QK" "DELTANET_SHARE_QK=maybe: expected true or false" ts gpus0 env DELTANET_SHARE_QK=maybe jobscripts/train.sh 2 32 "$tmp/e1"
expect_error "too many arguments" "train.sh takes at most 6 arguments" ts gpus0 jobscripts/train.sh 1 2 3 4 5 6 7
# the installed train.sh finds the installed binary with nothing on PATH
out=$(PATH=/usr/bin:/bin DELTAMLA_DATA=$tmp/text.txt DELTAMLA_FLAGS=$flags "$P/share/deltamla/jobscripts/train.sh" 2 32 "$tmp/w5" 2>&1)
[ $? -eq 0 ] && grep -q "deltamla job: $P/bin/deltamla train" <<<"$out" && ok "the installed train.sh runs the installed binary without PATH or module" ||
    nok "installed train.sh" "$(tail -n 2 <<<"$out")"
jobscripts/train.sh --help | grep -q "jobscripts/train.sh \[batch_size \[block_size \[output_dir \[resume \[optimizer\]\]\]\]\]" &&
    ok "train.sh --help prints its usage" || nok "train.sh --help"

# ---- the sbatch scripts outside a job ----
for s in train.sbatch train-multinode.sbatch prep.sbatch scaling.sbatch; do
    expect_error "$s outside Slurm" "$s is a Slurm batch script and SLURM_JOB_ID is not set: submit it with sbatch $s" bash "jobscripts/$s"
done
mkdir -p "$tmp/copy"
cp jobscripts/train.sbatch "$tmp/copy/"
expect_error "a copied script with no lib.sh and no module" "jobscripts/lib.sh not found beside the script" bash "$tmp/copy/train.sbatch"
expect_error "the copy with the module's DELTAMLA_JOBSCRIPTS" "train.sbatch is a Slurm batch script" env DELTAMLA_JOBSCRIPTS="$P/share/deltamla/jobscripts" bash "$tmp/copy/train.sbatch"
if command -v shellcheck >/dev/null; then
    shellcheck -x jobscripts/*.sbatch jobscripts/*.sh >"$tmp/sc.log" 2>&1 && ok "shellcheck finds nothing in the job scripts" || nok "shellcheck" "$(head -n 5 "$tmp/sc.log")"
fi

# srun's MPI plugin: pmix where `srun --mpi=list` has it, else pmi2, else none, each said
mpi_choice() { # plugins listed by a stand-in srun -> "DM_MPI | what the job says"
    mkdir -p "$tmp/srun_$1"
    printf '#!/bin/sh\necho "MPI plugin types are..."\nfor p in %s; do printf "\\t%%s\\n" "$p"; done\n' "${1//_/ }" >"$tmp/srun_$1/srun"
    chmod +x "$tmp/srun_$1/srun"
    PATH=$tmp/srun_$1:$PATH bash -c '. jobscripts/lib.sh; dm_srun_mpi; echo "$DM_MPI |"' 2>&1 | tr '\n' ' '
}
out=$(mpi_choice none_pmix_pmi2)
[[ "$out" == "pmix | "* ]] && ! grep -q note <<<"$out" && ok "srun --mpi=list with pmix: --mpi=pmix" || nok "pmix choice" "$out"
out=$(mpi_choice none_pmi2)
grep -q "note: this Slurm has no PMIx plugin (srun --mpi=list: MPI plugin types are... none pmi2 ); using --mpi=pmi2" <<<"$out" &&
    [[ "$out" == *"pmi2 | "* ]] && ok "no pmix: --mpi=pmi2, and the job says why" || nok "pmi2 fallback" "$out"
out=$(mpi_choice none)
grep -q "note: this Slurm has neither a PMIx nor a PMI-2 plugin; using --mpi=none" <<<"$out" && [[ "$out" == *"none | "* ]] &&
    ok "neither: --mpi=none, and the job says it starts one rank only" || nok "none fallback" "$out"

# ---- plot_scaling.py ----
cat >"$tmp/s.csv" <<'EOF'
mode,nodes,ranks,batch_per_rank,accumulation,global_batch,block_size,tokens_per_s,tokens_per_s_per_rank,efficiency
weak,1,1,8,1,8,2048,49000.0,49000.0,1.000
weak,1,4,8,1,32,2048,188000.0,47000.0,0.959
weak,2,8,8,1,64,2048,360000.0,45000.0,0.918
strong,1,1,8,8,64,2048,49000.0,49000.0,1.000
strong,2,8,8,1,64,2048,330000.0,41250.0,0.842
EOF
if python3 -c 'import matplotlib' 2>/dev/null; then
    out=$(python3 jobscripts/plot_scaling.py "$tmp/s.csv" 2>&1)
    [ "$(head -c 8 "$tmp/s.png" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] &&
        ok "plot_scaling.py draws a PNG next to the CSV: $out" || nok "plot_scaling.py" "$out"
else
    ok "# SKIP plot_scaling.py drawing: matplotlib is not installed"
fi
mkdir -p "$tmp/nompl/matplotlib"
echo 'raise ImportError("no matplotlib here")' >"$tmp/nompl/matplotlib/__init__.py"
out=$(PYTHONPATH=$tmp/nompl python3 jobscripts/plot_scaling.py "$tmp/s.csv" "$tmp/x.png" 2>&1)
rc=$?
[ $rc -eq 2 ] && grep -q "matplotlib is not installed, so no plot was drawn; install it (python3 -m pip install matplotlib)" <<<"$out" &&
    ok "without matplotlib plot_scaling.py says so and exits 2" || nok "no matplotlib" "rc=$rc $out"
head -n 1 "$tmp/s.csv" >"$tmp/empty.csv"
expect_error "plot_scaling.py on a CSV with no rows" "holds no measurements" python3 jobscripts/plot_scaling.py "$tmp/empty.csv"
echo "a,b" >"$tmp/other.csv" && echo "1,2" >>"$tmp/other.csv"
expect_error "plot_scaling.py on another CSV" "lacks the column(s) mode, nodes, ranks" python3 jobscripts/plot_scaling.py "$tmp/other.csv"
expect_error "plot_scaling.py on a missing file" "cannot read $tmp/none.csv" python3 jobscripts/plot_scaling.py "$tmp/none.csv"
exit 0
