#!/usr/bin/env bash
# 200 steps of the tiny config on tinyshakespeare on the CPU and on the GPU: the loss
# curves (averaged over windows of 20 steps) must agree within 2% at every window.
set -u
cd "$(dirname "$0")/../.."
data=${DELTAMLA_TEST_TEXT:-../shared/data/tinyshakespeare.txt}
[ -r "$data" ] || { echo "not ok - curve: $data missing (set DELTAMLA_TEST_TEXT)"; exit 1; }
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
flags="--size tiny --data $data --max_iters 200 --log_interval 1 --learning_rate 2e-3 --warmup_iters 20"
bin/deltamla train $flags --device cpu --output_dir "$d/cpu" >"$d/cpu.log" 2>&1 || { echo "not ok - curve: cpu run failed"; tail "$d/cpu.log"; exit 1; }
bin/deltamla train $flags --device cuda --output_dir "$d/gpu" >"$d/gpu.log" 2>&1 || { echo "not ok - curve: gpu run failed"; tail "$d/gpu.log"; exit 1; }
python3 - "$d/cpu/metrics.jsonl" "$d/gpu/metrics.jsonl" <<'PY'
import json, sys
c = [json.loads(l)["loss"] for l in open(sys.argv[1])]
g = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert len(c) == len(g) == 200, (len(c), len(g))
worst = 0.0
for w in range(0, 200, 20):
    a, b = sum(c[w:w+20]) / 20, sum(g[w:w+20]) / 20
    worst = max(worst, abs(a - b) / a)
print(f"# curve: cpu first/last {c[0]:.4f}/{sum(c[-20:])/20:.4f}, gpu {g[0]:.4f}/{sum(g[-20:])/20:.4f}")
print(f"{'ok' if worst <= 0.02 else 'not ok'} - 200-step loss curves GPU vs CPU agree within 2% (worst window {100*worst:.2f}%)")
PY
