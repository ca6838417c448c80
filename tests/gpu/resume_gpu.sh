#!/usr/bin/env bash
# Checkpoints from GPU memory: on the CUDA backend, 20 steps straight equal 10 steps, a
# resume and 10 more, bit for bit; the run trains on token shards made by prep, with
# --doc_mask; generate samples from the checkpoint.
set -u
cd "$(dirname "$0")/../.."
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
data=${DELTAMLA_TEST_TEXT:-../shared/data/tinyshakespeare.txt}
[ -r "$data" ] || { echo "not ok - resume_gpu: $data missing (set DELTAMLA_TEST_TEXT)"; exit 1; }
head -c 300000 "$data" > "$d/text.txt"
bin/deltamla prep --input "$d/text.txt" --output "$d/shards" --doc_split blank_line > "$d/prep.log" 2>&1 \
    || { echo "not ok - prep failed"; cat "$d/prep.log"; exit 1; }
flags="--size tiny --device cuda --data $d/shards --doc_mask --log_interval 1 --learning_rate 2e-3 --warmup_iters 5 --max_iters 20"
bin/deltamla train $flags --output_dir "$d/straight" > "$d/s.log" 2>&1 || { echo "not ok - straight run failed"; tail "$d/s.log"; exit 1; }
bin/deltamla train $flags --output_dir "$d/split" --checkpoint_interval 10 > "$d/a.log" 2>&1 &
pid=$!
# stop the first half with SIGUSR1 once step 10 has been logged, as a preempted job would
for i in $(seq 1 600); do grep -q '"step":10,' "$d/split/metrics.jsonl" 2>/dev/null && break; sleep 0.1; done
kill -USR1 $pid; wait $pid; rc=$?
[ $rc -eq 0 ] && echo "ok - SIGUSR1 on the GPU run: checkpoint and exit 0" || echo "not ok - SIGUSR1 exit status $rc"
bin/deltamla train $flags --output_dir "$d/split" > "$d/b.log" 2>&1 || { echo "not ok - resumed run failed"; tail "$d/b.log"; exit 1; }
python3 - "$d/straight/metrics.jsonl" "$d/split/metrics.jsonl" <<'PY'
import json, sys
def losses(p):
    out = {}
    for line in open(p):
        r = json.loads(line)
        if "loss" in r: out[r["step"]] = r["loss"]
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
same = len(a) == 20 and all(a[s] == b.get(s) for s in a)
print(f"{'ok' if same else 'not ok'} - GPU: 20 steps straight equal interrupted + resumed, bit for bit ({len(a)} steps, {len(b)} logged across both runs)")
PY
bin/deltamla ckpt verify "$d/split" > "$d/v.log" 2>&1 && echo "ok - checkpoint written from GPU memory verifies" || { echo "not ok - verify"; cat "$d/v.log"; }
out=$(bin/deltamla generate --ckpt "$d/split" --prompt "ROMEO:" --max_new_tokens 40 --seed 3 2>/dev/null)
[ -n "$out" ] && echo "ok - generate from the GPU-trained checkpoint: $(echo "$out" | head -c 60 | tr '\n' ' ')" || echo "not ok - generate"
