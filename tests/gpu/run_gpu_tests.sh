#!/usr/bin/env bash
# The GPU tests, for a machine with an NVIDIA GPU (make gpu-test builds and runs them):
# every CUDA op against its CPU op, whole steps GPU vs CPU, determinism, a 200-step loss
# curve GPU vs CPU on tinyshakespeare, the distributed cases over NCCL (with 4 GPUs), and
# compute-sanitizer memcheck of a small run.
# Without a GPU it prints one skip line and exits 0. Ends with "N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "skip: no NVIDIA GPU found (nvidia-smi -L failed); the GPU tests run only on a GPU machine"
    exit 0
fi
nvidia-smi -L
export NCCL_NVLS_ENABLE=0
RUN_SHOW_NOTES=1
. tests/runner.sh
for t in build/gpu_tests/test_gpu_*; do
    [ -x "$t" ] && run "$(basename "$t")" "$t"
done
run "loss curve gpu vs cpu" bash tests/gpu/curve.sh
gpus=$(nvidia-smi -L | grep -c '^GPU')
if [ "$gpus" -ge 4 ]; then
    # the CPU suite's distributed cases over NCCL, one rank per GPU, within bf16 tolerance
    run "distributed over NCCL (4 GPUs)" env DIST_DEVICE=cuda DIST_TOL=2e-2 bash tests/test_dist.sh
else
    echo "# skip: the distributed GPU cases need 4 GPUs ($gpus here): run make gpu-test on nvidia-h100-x4"
fi
run "checkpoint and resume on the GPU" bash tests/gpu/resume_gpu.sh
if command -v compute-sanitizer >/dev/null 2>&1; then
    run "compute-sanitizer memcheck" bash -c 'd=$(mktemp -d); printf "%s\n" "to be, or not to be, that is the question" {1..200} > $d/t.txt;
        compute-sanitizer --tool memcheck --error-exitcode 3 bin/deltamla train --device cuda --size tiny --max_iters 2 \
          --data $d/t.txt --output_dir $d/o > $d/log 2>&1; rc=$?; tail -3 $d/log;
        [ $rc -eq 0 ] && echo "ok - memcheck clean on a 2-step tiny run" || echo "not ok - memcheck (status $rc)"'
else
    echo "not ok - compute-sanitizer not found"
    failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
