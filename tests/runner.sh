# runner.sh: sourced by tests/run_tests.sh and tests/gpu/run_gpu_tests.sh.
# run NAME COMMAND...: runs one test program, counts its "ok - " and "not ok - " lines
# into $passed and $failed (a non-zero exit without a "not ok" line, or no check at all,
# counts as one failure), shows the failures (and the "# " notes when RUN_SHOW_NOTES=1),
# keeps the log in $GPU_TEST_LOGDIR when that is set, and prints a one-line summary.
passed=0
failed=0
run_log=$(mktemp)
trap 'rm -f "$run_log"' EXIT

run() {
    local name=$1
    shift
    local t0=$SECONDS
    "$@" >"$run_log" 2>&1
    local rc=$?
    local p f
    p=$(grep -c '^ok - ' "$run_log")
    f=$(grep -c '^not ok - ' "$run_log")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "not ok - $name exited with status $rc"; fi
    if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then f=1; echo "not ok - $name ran no checks"; fi
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "${RUN_SHOW_NOTES:-0}" = 1 ]; then grep -E '^(not ok - |# )' "$run_log"; else grep '^not ok - ' "$run_log"; fi
    if [ "$f" -ne 0 ]; then
        echo "---- output of $name ----"
        tail -n 40 "$run_log"
        echo "----"
    fi
    [ -n "${GPU_TEST_LOGDIR:-}" ] && cp "$run_log" "$GPU_TEST_LOGDIR/${name// /_}.log"
    printf '%-34s %4d passed, %d failed (%ds)\n' "$name" "$p" "$f" $((SECONDS - t0))
}
