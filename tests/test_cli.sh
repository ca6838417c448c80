#!/usr/bin/env bash
# Command-line tests of bin/deltamla: the acceptance parameter counts, bad input (one
# clear line and a non-zero exit), reproducibility, gradient checkpointing, the metrics
# file and the non-finite stop. Prints "ok - ..." / "not ok - ..." lines.
set -u
cd "$(dirname "$0")/.."
bin=bin/deltamla
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data=$tmp/text.txt
# a small real text of our own: the test needs no download
for i in $(seq 1 40); do
    echo "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. $i"
done >"$data"

ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }

# --- acceptance figure (MODEL.md section 10) ---
out=$($bin info --size moe-1b --deltanet_latent_dim 256 --deltanet_share_qk --mla_q_lora_rank 256)
if grep -q '^total parameters:  296,719,668$' <<<"$out" && grep -q '^active parameters: 205,493,556 ' <<<"$out"; then
    ok "info moe-1b advanced example: 296,719,668 total, 205,493,556 active"
else
    nok "info moe-1b advanced example" "$(tail -2 <<<"$out" | tr '\n' ' ')"
fi
grep -q 'transformer.h.2.attn.wkv_a.weight  *\[261, 1024\]' <<<"$out" && ok "info lists tensors with shapes (layer 2 kv rank 197)" \
    || nok "info lists tensors with shapes"

# --- bad input: one line on stderr naming the problem, non-zero exit ---
expect_error() { # description, expected text (grep -E), args...
    local what=$1 want=$2
    shift 2
    local err rc
    err=$($bin "$@" 2>&1 >/dev/null)
    rc=$?
    local lines
    lines=$(printf '%s' "$err" | grep -c '')
    if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -qE -e "$want" <<<"$err"; then
        ok "bad input: $what -> $err"
    else
        nok "bad input: $what" "rc=$rc lines=$lines stderr=[$err]"
    fi
}
T="train --size tiny --data $data --output_dir $tmp/o --max_iters 2"
expect_error "unknown flag" "unknown flag --bogus" $T --bogus 3
expect_error "malformed integer" "--batch_size: 'abc' is not an integer" $T --batch_size abc
expect_error "malformed float" "--learning_rate: '1e-3x'" $T --learning_rate 1e-3x
expect_error "missing value" "--max_iters" $T --max_iters
expect_error "latent ratio not dividing d" "n_embd 66 is not divisible by --latent_ratio 4|divisible" $T --n_embd 66 --latent_ratio 4 --n_head 6
expect_error "top-k larger than experts" "top-k .* larger than" $T --n_activated 5
expect_error "odd rope dim" "rope" $T --mla_qk_rope_head_dim 7
expect_error "missing data file" "cannot open data file $tmp/nope.txt" train --size tiny --data $tmp/nope.txt --output_dir $tmp/o
expect_error "no data flag" "no training data" train --size tiny --output_dir $tmp/o
expect_error "data shorter than a row" "fewer than one row" train --size tiny --data $data --block_size 100000 --output_dir $tmp/o
expect_error "vocab too small for bytes" "vocab_size" train --size tiny --data $data --vocab_size 50 --output_dir $tmp/o
expect_error "unknown command" "unknown command 'trian'" trian --size tiny
expect_error "unknown size" "unknown --size 'huge'" info --size huge

# --- reproducibility: same seed and flags give bit-identical losses ---
run() { $bin train --size tiny --data "$data" --max_iters 8 --log_interval 1 --learning_rate 2e-3 --warmup_iters 2 "$@" >/dev/null; }
run --output_dir "$tmp/a" && run --output_dir "$tmp/b" && run --output_dir "$tmp/c" --gradient_checkpointing &&
    run --output_dir "$tmp/d" --seed 7
losses() { grep -o '"loss":[^,]*' "$1/metrics.jsonl"; }
n=$(losses "$tmp/a" | grep -c '')
[ "$n" -eq 8 ] && ok "metrics.jsonl has one record per logged step ($n)" || nok "metrics.jsonl records" "$n"
grep -q '"grad_norm"' "$tmp/a/metrics.jsonl" && grep -q '"tokens_per_s"' "$tmp/a/metrics.jsonl" && grep -q '"lr"' "$tmp/a/metrics.jsonl" \
    && ok "metrics.jsonl carries loss, lr, grad norm, tokens/s" || nok "metrics.jsonl fields"
[ -n "$(losses "$tmp/a")" ] && [ "$(losses "$tmp/a")" == "$(losses "$tmp/b")" ] && ok "same seed: bit-identical losses" || nok "same seed: bit-identical losses"
[ -n "$(losses "$tmp/c")" ] && [ "$(losses "$tmp/a")" == "$(losses "$tmp/c")" ] && ok "--gradient_checkpointing: identical losses" || nok "--gradient_checkpointing: identical losses"
[ -n "$(losses "$tmp/d")" ] && [ "$(losses "$tmp/a")" != "$(losses "$tmp/d")" ] && ok "another seed: other losses" || nok "another seed: other losses"
python3 - "$tmp/a/metrics.jsonl" <<'PY' && ok "losses decrease over 8 steps" || nok "losses decrease over 8 steps"
import json, sys
l = [json.loads(x)["loss"] for x in open(sys.argv[1])]
sys.exit(0 if l[-1] < l[0] else 1)
PY

# --- non-finite values stop the run with the step named, or are skipped on request ---
err=$($bin train --size tiny --data "$data" --max_iters 20 --optimizer_type adamw --learning_rate 1e30 --warmup_iters 0 --output_dir "$tmp/n" 2>&1 >/dev/null)
rc=$?
if [ $rc -ne 0 ] && grep -qE "non-finite (loss|gradient norm) at step [0-9]+" <<<"$err" && [ "$(printf '%s' "$err" | grep -c '')" -eq 1 ]; then
    ok "non-finite stop: $err"
else
    nok "non-finite stop" "rc=$rc [$err]"
fi
out=$($bin train --size tiny --data "$data" --max_iters 20 --optimizer_type adamw --learning_rate 1e30 --warmup_iters 0 --skip_nonfinite --output_dir "$tmp/s" 2>&1)
rc=$?
[ $rc -eq 0 ] && grep -qE "[0-9]+ non-finite steps were skipped" <<<"$out" && ok "--skip_nonfinite skips and counts" \
    || nok "--skip_nonfinite" "rc=$rc $(tail -3 <<<"$out")"
exit 0
