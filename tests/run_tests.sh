#!/usr/bin/env bash
# Runs every CPU test and prints one summary line "N passed, N failed".
#   build/tests/test_*    C test programs (op gradients, GDN, config, ...)
#   tests/test_*.sh       command-line tests of bin/deltamla
#   tests/reference/      the whole model against the PyTorch float64 reference
# Each test prints "ok - ..." / "not ok - ..." lines; a program that exits non-zero
# without a "not ok" line counts as one failure. `make test` builds everything first.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# the tests start MPI jobs (mpirun --oversubscribe); CI runs as root
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
. tests/runner.sh

for t in build/tests/test_*; do
    [ -x "$t" ] && run "$(basename "$t")" "$t"
done
for t in tests/test_*.sh; do
    run "$(basename "$t")" bash "$t"
done
run "reference self-check" python3 tests/reference/selfcheck.py
run "reference (PyTorch float64)" python3 tests/reference/test_reference.py build/tests/refdump

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
