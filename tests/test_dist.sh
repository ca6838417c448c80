#!/usr/bin/env bash
# Distributed training (issue "Distributed training"): for one fixed global batch of 4
# rows and one seed, these layouts must give the same first 10 losses and the same
# parameters after 10 steps (relative tolerance DIST_TOL, 1e-5 on the CPU):
#   np 1 (batch 4) | np 2 data parallel (batch 2) | np 4 = DP 2 x EP 2 (batch 1)
#   np 4 with --zero 1 | np 4 with --ep 2 --zero 1 (and AdamW for the first and last)
#   np 2 --ep 2 with gradient accumulation and checkpointing against np 1 accumulating
#   np 2 --ep 2 on token shards with --doc_mask and validation passes against np 1
# Resuming in another layout continues with the same losses (np 4 / ep 2 / zero 1 at
# step 5 -> np 2 -> np 1 and back to np 4 / ep 2); killing one rank ends the job non-zero
# in bounded time; impossible layouts are refused with one line.
# Muon runs at the default learning rate (1e-4, so 2e-2 for the matrices): its fp32
# Newton-Schulz iterations multiply the smallest singular directions of each gradient by up
# to 3.4445^5 ~ 480, so the last-bit differences of a sum taken in another order (one
# rank's float sum vs two ranks' partial sums) grow about 1.4x per step; at 1e-3 the
# parameters of np 1 and np 2 drift 1.7e-5 apart by step 10 although every loss agrees to
# 1e-7. AdamW has no such amplification and runs at 1e-3.
# The same script runs on GPUs (tests/gpu/run_gpu_tests.sh): DIST_DEVICE=cuda, NCCL, and
# a bf16 tolerance.
set -u
cd "$(dirname "$0")/.."
data=${DELTAMLA_TEST_TEXT:-../shared/data/tinyshakespeare.txt}
device=${DIST_DEVICE:-cpu}
tol=${DIST_TOL:-1e-5}
if [ ! -r "$data" ]; then
    echo "not ok - dist: $data is missing (the test reads ../shared/data/tinyshakespeare.txt)"
    exit 1
fi
if ! command -v mpirun >/dev/null; then
    echo "not ok - dist: mpirun not found (install openmpi-bin)"
    exit 1
fi
if ! python3 -c "import numpy" 2>/dev/null; then
    echo "not ok - dist: python3 with numpy is needed to compare parameters"
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ "$device" = cuda ]; then # one rank per GPU: NCCL refuses two ranks on one GPU
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if [ "$gpus" -lt 4 ]; then
        echo "skip: $gpus GPU(s) visible; the distributed GPU cases run 4 ranks and need 4 GPUs (nvidia-h100-x4)"
        exit 0
    fi
fi
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
threads=1
[ "$device" = cpu ] || threads=0

# run NAME NP BATCH [flags...]: 10 steps (unless flags say otherwise) into $out/NAME
run() {
    local name=$1 np=$2 batch=$3
    shift 3
    mkdir -p "$out/$name"
    mpirun -np "$np" --bind-to none bin/deltamla train --size tiny --device "$device" --threads $threads \
        --data "$data" --block_size 64 --batch_size "$batch" --max_iters 10 --warmup_iters 2 \
        --learning_rate "${LR:-1e-4}" --log_interval 1 --checkpoint_interval 5 --keep_checkpoints 0 \
        --output_dir "$out/$name" "$@" >"$out/$name/log.txt" 2>&1
}

# load_st FILE: a safetensors file as {name: float64 array}, with numpy alone
read -r -d '' load_st <<'PY'
import json, struct
import numpy as np
def load_st(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(v["shape"]).astype(np.float64)
    return out
PY

compare() { # compare NAME REF: losses and final parameters of NAME vs REF
    for d in "$1" "$2"; do
        [ -f "$out/$d/export/model.safetensors" ] || bin/deltamla ckpt export "$out/$d" --out "$out/$d/export" >/dev/null
    done
    python3 - "$out/$1" "$out/$2" "$tol" "$1" "$2" <<PY
import os, sys
$load_st
a, b, tol, na, nb = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
def losses(d):
    import json
    out = {}
    for line in open(os.path.join(d, "metrics.jsonl")):
        r = json.loads(line)
        if "loss" in r: out[r["step"]] = r["loss"]
    return out
la, lb = losses(a), losses(b)
steps = sorted(set(la) & set(lb))
worst = max(abs(la[s] - lb[s]) / abs(lb[s]) for s in steps) if steps else float("inf")
ok = len(steps) >= 5 and worst <= tol
print(f"{'ok' if ok else 'not ok'} - dist: {na} vs {nb}: losses of steps {steps[0] if steps else '-'}.."
      f"{steps[-1] if steps else '-'} agree to {worst:.2e} relative (tolerance {tol:g})")
x, y = load_st(os.path.join(a, "export/model.safetensors")), load_st(os.path.join(b, "export/model.safetensors"))
# numpy.allclose's sense: |a - b| <= tol + tol |b| for every element
worst, where, close = 0.0, "", True
for n in sorted(x):
    if n not in y or x[n].shape != y[n].shape:
        close = False
        continue
    p, q = x[n], y[n]
    close = close and bool(np.all(np.abs(p - q) <= tol + tol * np.abs(q)))
    r = float(np.abs(p - q).max()) / max(float(np.abs(q).max()), 1e-30)
    if r > worst: worst, where = r, n
ok = close and sorted(x) == sorted(y)
print(f"{'ok' if ok else 'not ok'} - dist: {na} vs {nb}: final parameters within {tol:g} (allclose); largest "
      f"difference {worst:.2e} of its tensor's largest value ({where}; {len(x)} tensors)")
PY
}

fail_run() { echo "not ok - dist: $1 failed to run"; tail -5 "$out/$2/log.txt"; }

run np1 1 4 && LR=1e-3 run np1_adamw 1 4 --optimizer_type adamw || { fail_run "np 1" np1; exit 1; }
if run np2 2 2; then compare np2 np1; else fail_run "np 2 (data parallel)" np2; fi
if run np4_ep2 4 1 --ep 2; then compare np4_ep2 np1; else fail_run "np 4 --ep 2" np4_ep2; fi
if run np4_zero 4 1 --zero 1; then compare np4_zero np1; else fail_run "np 4 --zero 1" np4_zero; fi
if run np4_ep2_zero 4 1 --ep 2 --zero 1; then compare np4_ep2_zero np1; else fail_run "np 4 --ep 2 --zero 1" np4_ep2_zero; fi
if LR=1e-3 run np4_ep4_zero_adamw 4 1 --ep 4 --zero 1 --optimizer_type adamw; then
    compare np4_ep4_zero_adamw np1_adamw
else
    fail_run "np 4 --ep 4 --zero 1 adamw" np4_ep4_zero_adamw
fi
# gradient accumulation and checkpointing: the recomputed forward repeats the exchange
if run np1_ga 1 2 --gradient_accumulation_steps 2 && run np2_ep2_ga_gc 2 1 --gradient_accumulation_steps 2 --ep 2 \
    --gradient_checkpointing; then
    compare np2_ep2_ga_gc np1_ga
else
    fail_run "accumulation + checkpointing" np2_ep2_ga_gc
fi
grep -q "ranks 4 (4 per node): data parallel 4, expert parallel 2 (4 of 8 routed experts per rank), zero 1" \
    "$out/np4_ep2_zero/log.txt" && echo "ok - dist: the log names the layout" ||
    { echo "not ok - dist: the layout line is missing"; head -5 "$out/np4_ep2_zero/log.txt"; }

# the expert shards and the optimizer shards land in one file of full logical shapes
tensors() { bin/deltamla ckpt info "$1" | sed -n '/^tensors/,$p'; }
if bin/deltamla ckpt verify "$out/np4_ep2_zero/ckpt_00000010.h5" >/dev/null &&
    [ "$(tensors "$out/np4_ep2_zero/ckpt_00000010.h5")" = "$(tensors "$out/np1/ckpt_00000010.h5")" ]; then
    echo "ok - dist: a checkpoint of np 4 / ep 2 / zero 1 verifies and lists np 1's tensors and shapes"
else
    echo "not ok - dist: the np 4 / ep 2 / zero 1 checkpoint differs in structure from np 1's or fails verify"
fi

# resume in other layouts: np4/ep2/zero1 step 5 -> np 2 (steps 5-9), its step-5 file -> np 1,
# np 1's step 5 -> np 4 / ep 2; each continues with np 1's losses
resume_from() { # NAME NP BATCH CKPT [flags]
    local name=$1 np=$2 batch=$3 ck=$4
    shift 4
    run "$name" "$np" "$batch" --resume "$ck" "$@"
}
resume_from r_np2 2 2 "$out/np4_ep2_zero/ckpt_00000005.h5" && compare r_np2 np1 || fail_run "resume np 4 -> np 2" r_np2
resume_from r_np1 1 4 "$out/r_np2/ckpt_00000010.h5" --max_iters 12 || fail_run "resume np 2 -> np 1" r_np1
resume_from r_np4 4 1 "$out/np2/ckpt_00000005.h5" --ep 2 --zero 1 && compare r_np4 np1 || fail_run "resume np 2 -> np 4" r_np4
grep -q '"resumed_from"' "$out/r_np1/metrics.jsonl" && grep -q '"step":11' "$out/r_np1/metrics.jsonl" &&
    echo "ok - dist: np 1 resumes the np 2 run's final checkpoint (made from an np 4 / ep 2 / zero 1 one) and trains on" ||
    { echo "not ok - dist: np 1 did not continue from the np 2 checkpoint"; tail -3 "$out/r_np1/log.txt"; }

# token shards with documents: --doc_mask and validation passes (val loss reduced over
# ranks) under data and expert parallelism give one rank's numbers
if bin/deltamla prep --input "$data" --output "$out/shards" >/dev/null 2>&1; then
    vflags=(--data "$out/shards" --doc_mask --val_fraction 0.1 --eval_interval 5 --eval_iters 2)
    if run d_np1 1 4 "${vflags[@]}" && run d_np2_ep2 2 2 "${vflags[@]}" --ep 2; then
        compare d_np2_ep2 d_np1
        python3 - "$out/d_np1/metrics.jsonl" "$out/d_np2_ep2/metrics.jsonl" "$tol" <<'PY'
import json, sys
def val(path):
    return {r["step"]: r["val_loss"] for r in map(json.loads, open(path)) if "val_loss" in r}
a, b, tol = val(sys.argv[1]), val(sys.argv[2]), float(sys.argv[3])
worst = max((abs(a[s] - b[s]) / abs(a[s]) for s in a if s in b), default=float("inf"))
ok = len(a) == 2 and sorted(a) == sorted(b) and worst <= tol
print(f"{'ok' if ok else 'not ok'} - dist: validation losses of np 2 --ep 2 (steps {sorted(b)}) equal np 1's to "
      f"{worst:.2e} relative")
PY
    else
        fail_run "doc_mask + validation on shards" d_np2_ep2
    fi
else
    echo "not ok - dist: prep of the test shards failed"
fi

# impossible layouts: one clear line, non-zero exit
check_refused() { # WHAT NP PATTERN [flags]
    local what=$1 np=$2 pat=$3
    shift 3
    mkdir -p "$out/bad"
    if mpirun -np "$np" bin/deltamla train --size tiny --device "$device" --data "$data" --max_iters 1 \
        --output_dir "$out/bad" "$@" >"$out/bad/log.txt" 2>&1; then
        echo "not ok - dist: $what was accepted"
    elif grep -q "$pat" "$out/bad/log.txt"; then
        echo "ok - dist: $what is refused: $(grep -m1 'deltamla: error' "$out/bad/log.txt")"
    else
        echo "not ok - dist: $what: expected '$pat'"
        tail -3 "$out/bad/log.txt"
    fi
}
check_refused "--ep 3 (8 experts)" 3 "does not divide the 8 routed experts" --ep 3
check_refused "--ep 4 on 2 ranks" 2 "does not divide the 2 ranks" --ep 4
check_refused "--zero 2" 2 "only 0 (off) and 1" --zero 2

# a rank killed mid-run: the job must end non-zero within a bounded time
mkdir -p "$out/kill"
t0=$SECONDS
mpirun -np 2 --bind-to none bin/deltamla train --size tiny --device "$device" --threads $threads --data "$data" \
    --block_size 64 --batch_size 2 --max_iters 100000 --log_interval 1 --checkpoint_interval 0 \
    --output_dir "$out/kill" >"$out/kill/log.txt" 2>&1 &
job=$!
for _ in $(seq 600); do grep -q "^step      3" "$out/kill/log.txt" 2>/dev/null && break; sleep 0.1; done
victim=$(pgrep -f "deltamla train.*$out/kill" | tail -1)
tk=$SECONDS
[ -n "$victim" ] && kill -9 "$victim"
for _ in $(seq 600); do kill -0 $job 2>/dev/null || break; sleep 0.1; done
if kill -0 $job 2>/dev/null; then
    echo "not ok - dist: the job still runs 60 s after one rank was killed"
    pkill -9 -f "deltamla train.*$out/kill"
    wait $job 2>/dev/null
else
    wait $job
    rc=$?
    [ -n "$victim" ] && [ $rc -ne 0 ] &&
        echo "ok - dist: killing one of 2 ranks ends the job with status $rc after $((SECONDS - tk)) s" ||
        echo "not ok - dist: killing one rank: victim '$victim', status $rc"
fi
