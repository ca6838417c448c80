#!/usr/bin/env bash
# Learning test: the tiny config trained for 300 steps on tinyshakespeare (bytes) must
# reach a training loss well below the byte unigram entropy of the text, the best any
# model that ignores context can do. Bound asserted: the mean loss of the last 20 steps
# is below 0.75 x the unigram entropy (3.31 nats for this file, so below 2.48).
set -u
cd "$(dirname "$0")/.."
data=${DELTAMLA_TEST_TEXT:-../shared/data/tinyshakespeare.txt}
if [ ! -r "$data" ]; then
    echo "not ok - learning: $data is missing (the test reads ../shared/data/tinyshakespeare.txt)"
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
t0=$SECONDS
bin/deltamla train --size tiny --data "$data" --max_iters 300 --log_interval 1 --learning_rate 2e-3 \
    --warmup_iters 20 --output_dir "$out" >"$out/log.txt" 2>&1 || { echo "not ok - learning: train failed"; tail -5 "$out/log.txt"; exit 1; }
secs=$((SECONDS - t0))
python3 - "$data" "$out/metrics.jsonl" "$secs" <<'PY'
import collections, json, math, sys
text = open(sys.argv[1], "rb").read()
counts = collections.Counter(text)
n = len(text)
entropy = -sum(c / n * math.log(c / n) for c in counts.values())
losses = [json.loads(line)["loss"] for line in open(sys.argv[2])]
final = sum(losses[-20:]) / 20
bound = 0.75 * entropy
ok = len(losses) == 300 and final < bound
print(f"{'ok' if ok else 'not ok'} - learning: 300 steps reach loss {final:.3f} (mean of the last 20), "
      f"bound 0.75 x unigram entropy {entropy:.3f} = {bound:.3f} nats; first loss {losses[0]:.3f}; {sys.argv[3]} s")
PY
