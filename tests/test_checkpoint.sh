#!/usr/bin/env bash
# Checkpoint tests (io/checkpoint.c and the resume logic of src/train.c), on the tiny
# model on the CPU with a small batch so that they run in about a minute on two cores:
#   (a) 20 steps straight = 10 steps + resume + 10 steps, bit for bit (losses, gradient
#       norms and the final checkpoint), for muon and adamw
#   (b) a checkpoint with flipped bytes in a dataset, or truncated, is refused with a
#       line naming the problem and the run falls back to the previous good one; with
#       no good one at all the run stops instead of starting afresh; damaged metadata
#       is caught by HDF5's own checksums
#   (c) kill -9 inside a save leaves `latest` on the last complete checkpoint
#   (d) a checkpoint of another model (or optimizer) is refused naming the mismatch
#   (e, f) SIGUSR1 and SIGTERM: the run saves, exits 0, and the resumed run ends with
#       the losses and weights of the uninterrupted run
#   the file layout (groups, attributes, CRC-32 = zlib.crc32 of each dataset's bytes),
#   --keep_checkpoints, and the collective writer under mpirun -np 1, 2 and 4 (every
#   rank writing its slice gives the same bytes as one rank writing everything).
# Prints "ok - ..." / "not ok - ..." lines.
set -u
cd "$(dirname "$0")/.."
bin=bin/deltamla
tool=build/tests/ckpt_mpi_check
tmp=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
data=$tmp/text.txt
for i in $(seq 1 40); do
    echo "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. $i"
done >"$data"

ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }
[ -x "$tool" ] || { nok "build/tests/ckpt_mpi_check is not built (make tests-build)"; exit 1; }

flags() { # optimizer
    echo --size tiny --data "$data" --device cpu --batch_size 2 --block_size 32 --max_iters 20 --log_interval 1 \
        --learning_rate 2e-3 --warmup_iters 2 --optimizer_type "$1"
}
# every per-step record of a metrics file, without the timing: "step loss zloss grad_norm"
steps() { python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "loss" in r: print(r["step"], repr(r["loss"]), repr(r["zloss"]), repr(r["grad_norm"]))' "$1"; }
one_line() { [ "$(printf '%s' "$1" | grep -c '')" -eq 1 ]; }
latest() { cat "$1/latest" 2>/dev/null; }

# --- (a) 20 straight = 10 + resume + 10, bit for bit ---
for opt in muon adamw; do
    s=$tmp/straight_$opt r=$tmp/resumed_$opt
    $bin train $(flags $opt) --output_dir "$s" --checkpoint_interval 10 >"$s.log" 2>&1 || nok "$opt: straight run" "$(tail -2 "$s.log")"
    $bin train $(flags $opt) --output_dir "$r" --resume "$s/ckpt_00000010.h5" >"$r.log" 2>&1 || nok "$opt: resumed run" "$(tail -2 "$r.log")"
    want=$(steps "$s/metrics.jsonl" | awk '$1 >= 10')
    got=$(steps "$r/metrics.jsonl")
    if [ -n "$want" ] && [ "$want" == "$got" ] && [ "$(grep -c '' <<<"$got")" -eq 10 ]; then
        ok "$opt: 10 steps + resume + 10 steps give the straight run's losses, z-losses and grad norms bit for bit"
    else
        nok "$opt: resumed losses" "$(diff <(echo "$want") <(echo "$got") | head -4 | tr '\n' ' ')"
    fi
    out=$($tool same "$s/ckpt_00000020.h5" "$r/ckpt_00000020.h5")
    [ $? -eq 0 ] && ok "$opt: final checkpoints are identical ($out)" || nok "$opt: final checkpoints" "$out"
done
S=$tmp/straight_muon
grep -q "resumed from $S/ckpt_00000010.h5: step 10, data epoch 0 row 20" "$tmp/resumed_muon.log" \
    && ok "the resumed run says where it resumed (step, data position)" || nok "resume line" "$(sed -n 3p "$tmp/resumed_muon.log")"

# --- the file layout ---
python3 - "$S/ckpt_00000020.h5" "$tmp/straight_adamw/ckpt_00000020.h5" <<'PY' && ok "layout: /params, /optim/m, /optim/v (AdamW tensors only), /router_bias/<layer>, root attributes, crc32 = zlib.crc32 of every dataset" || nok "layout"
import h5py, json, sys, zlib
muon, adamw = (h5py.File(p, "r") for p in sys.argv[1:])
def check(f, opt):
    a = f.attrs
    assert a["format"] == b"deltamla-checkpoint" and a["version"] == 1, dict(a)
    assert a["step"] == 20 and a["skipped"] == 0 and a["seed"] == 1337 and a["data_rows"] == 150, dict(a)
    assert (a["data_epoch"], a["data_row"]) == (0, 40), (a["data_epoch"], a["data_row"])  # 20 steps x B 2
    assert "tokenizer" not in a  # raw bytes: no tokenizer
    cfg = json.loads(a["config"])
    assert cfg["n_embd"] == 64 and cfg["optimizer_type"] == opt
    assert f["optim"].attrs["type"] == opt.encode() and f["optim"].attrs["step"] == 20
    assert set(f) == {"params", "optim", "router_bias"}, set(f)
    assert f["params/transformer.h.2.attn.wkv_a.weight"].shape == (72, 64)
    assert list(f["router_bias"]) == ["2"] and f["router_bias/2"].shape == (8,)
    assert set(f["optim/m"]) == set(f["params"])
    n = 0
    def visit(name, obj):
        nonlocal n
        if isinstance(obj, h5py.Dataset):
            assert obj.dtype == "<f4", name
            assert zlib.crc32(obj[()].tobytes()) == obj.attrs["crc32"], name
            n += 1
    f.visititems(visit)
    return n
check(adamw, "adamw")
check(muon, "muon")
# Muon keeps no second moment for its matrices; AdamW keeps one for every tensor
assert set(adamw["optim/v"]) == set(adamw["params"])
v = set(muon["optim/v"])
assert "transformer.wte.weight" in v and "transformer.h.0.attn.q_proj.weight" not in v, sorted(v)[:5]
PY

# --- (b) corrupt and truncated checkpoints ---
flip() { # file dataset: flip 8 bytes in the middle of the dataset's data
    python3 - "$1" "$2" <<'PY'
import h5py, sys
with h5py.File(sys.argv[1], "r") as f:
    ds = f[sys.argv[2]]
    off = ds.id.get_offset() + ds.id.get_storage_size() // 2
with open(sys.argv[1], "r+b") as f:
    f.seek(off)
    b = f.read(8)
    f.seek(off)
    f.write(bytes(x ^ 0xFF for x in b))
PY
}
b1=$tmp/corrupt
cp -r "$S" "$b1"
flip "$b1/ckpt_00000020.h5" /params/transformer.wte.weight
out=$($tool verify "$b1/ckpt_00000020.h5")
grep -q "dataset /params/transformer.wte.weight fails its checksum" <<<"$out" && ok "ckpt_verify names the damaged dataset: $out" \
    || nok "ckpt_verify of a damaged file" "$out"
# damaged metadata (a dataset's object header) is caught by HDF5's own checksums
cp "$S/ckpt_00000020.h5" "$tmp/header.h5"
python3 - "$tmp/header.h5" /optim/m/transformer.ln_f.weight <<'PY'
import h5py, sys
with h5py.File(sys.argv[1], "r") as f:
    addr = h5py.h5o.get_info(f[sys.argv[2]].id).addr
with open(sys.argv[1], "r+b") as f:
    f.seek(addr + 24)
    b = f.read(4)
    f.seek(addr + 24)
    f.write(bytes(x ^ 0xFF for x in b))
PY
out=$($tool verify "$tmp/header.h5")
grep -q "dataset /optim/m/transformer.ln_f.weight cannot be opened (incorrect metadata checksum" <<<"$out" \
    && ok "damaged metadata is caught too: $out" || nok "ckpt_verify of damaged metadata" "$out"
$bin train $(flags muon) --output_dir "$b1" >"$b1.log" 2>"$b1.err"
rc=$?
if [ $rc -eq 0 ] && grep -q "warning: cannot resume from $b1/ckpt_00000020.h5: .*/params/transformer.wte.weight fails its checksum" "$b1.err" &&
    grep -q "resuming from the older checkpoint $b1/ckpt_00000010.h5" "$b1.err"; then
    ok "flipped bytes in a dataset: refused, falls back to the previous checkpoint: $(head -1 "$b1.err")"
else
    nok "corrupt checkpoint fallback" "rc=$rc $(cat "$b1.err")"
fi
[ "$(steps "$b1/metrics.jsonl" | awk '$1 >= 10' | tail -10)" == "$(steps "$S/metrics.jsonl" | awk '$1 >= 10')" ] \
    && ok "after the fallback the run continues with the straight run's losses" || nok "losses after the fallback"
grep -q '"resumed_from"' "$b1/metrics.jsonl" && [ "$(steps "$b1/metrics.jsonl" | grep -c '')" -eq 30 ] \
    && ok "metrics.jsonl is appended on resume (20 + 10 records and a resume record)" || nok "metrics appended"

b2=$tmp/truncated
cp -r "$S" "$b2"
truncate -s $(($(stat -c %s "$b2/ckpt_00000020.h5") / 2)) "$b2/ckpt_00000020.h5"
$bin train $(flags muon) --max_iters 10 --output_dir "$b2" >"$b2.log" 2>"$b2.err"
rc=$?
if [ $rc -eq 0 ] && grep -q "warning: cannot resume from $b2/ckpt_00000020.h5: not readable as HDF5 (truncated file" "$b2.err" &&
    grep -q "resumed from $b2/ckpt_00000010.h5" "$b2.log"; then
    ok "truncated checkpoint: refused, falls back: $(head -1 "$b2.err")"
else
    nok "truncated checkpoint fallback" "rc=$rc $(cat "$b2.err")"
fi
$bin train $(flags muon) --max_iters 10 --output_dir "$tmp/explicit" --resume "$b2/ckpt_00000020.h5" >"$tmp/explicit.log" 2>&1 &&
    grep -q "resumed from $b2/ckpt_00000010.h5" "$tmp/explicit.log" \
    && ok "--resume FILE that is damaged: falls back to the previous checkpoint in its directory" \
    || nok "explicit damaged --resume" "$(cat "$tmp/explicit.log" | head -3)"

b3=$tmp/nogood
cp -r "$b2" "$b3"
flip "$b3/ckpt_00000010.h5" /optim/m/transformer.ln_f.weight
err=$($bin train $(flags muon) --output_dir "$b3" 2>&1 >/dev/null)
rc=$?
last=$(tail -1 <<<"$err")
if [ $rc -ne 0 ] && grep -q "deltamla: error: no checkpoint to resume from: .*pass --resume none" <<<"$last" &&
    [ ! -e "$b3/ckpt_00000001.h5" ]; then
    ok "no good checkpoint at all: the run stops instead of starting afresh: $last"
else
    nok "no good checkpoint" "rc=$rc $err"
fi

# --- (c) kill -9 inside a save ---
k=$tmp/killed
mkdir -p "$k"
cp "$S/ckpt_00000010.h5" "$k/"
echo ckpt_00000010.h5 >"$k/latest"
DELTAMLA_TEST_SLOW_SAVE=60 $bin train $(flags muon) --max_iters 12 --output_dir "$k" >"$k.log" 2>"$k.err" &
pid=$!
for _ in $(seq 1 600); do grep -q "DELTAMLA_TEST_SLOW_SAVE" "$k.err" && break; sleep 0.1; done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
if [ "$(latest "$k")" == "ckpt_00000010.h5" ] && [ -e "$k/.ckpt_00000012.h5.tmp" ] && [ ! -e "$k/ckpt_00000012.h5" ]; then
    ok "kill -9 between writing and renaming a save: latest still names ckpt_00000010.h5"
else
    nok "kill -9 during a save" "latest=$(latest "$k") $(ls -a "$k" | tr '\n' ' ') $(cat "$k.err")"
fi
$bin train $(flags muon) --max_iters 12 --output_dir "$k" >"$k.log2" 2>&1
rc=$?
if [ $rc -eq 0 ] && grep -q "resumed from $k/ckpt_00000010.h5" "$k.log2" && [ "$(latest "$k")" == "ckpt_00000012.h5" ] &&
    [ ! -e "$k/.ckpt_00000012.h5.tmp" ]; then
    ok "after kill -9 the next run resumes from the last complete checkpoint and clears the partial file"
else
    nok "resume after kill -9" "rc=$rc $(tail -3 "$k.log2")"
fi

# --- (d) another model, another optimizer ---
expect_refusal() { # what, expected text, flags...
    local what=$1 want=$2
    shift 2
    local err rc
    err=$($bin train "$@" 2>&1 >/dev/null)
    rc=$?
    if [ $rc -ne 0 ] && one_line "$err" && grep -qF -e "$want" <<<"$err"; then ok "$what: $err"; else nok "$what" "rc=$rc [$err]"; fi
}
expect_refusal "another width" "checkpoint $S/ckpt_00000010.h5 has n_embd 64 but this run has 48" \
    $(flags muon) --n_embd 48 --output_dir "$tmp/d1" --resume "$S/ckpt_00000010.h5"
expect_refusal "another depth" "has n_layer 3 but this run has 4" $(flags muon) --n_layer 4 --output_dir "$tmp/d2" --resume "$S/ckpt_00000010.h5"
expect_refusal "other experts (auto-resume from latest)" "has moe_E 8 but this run has 16" \
    $(flags muon) --n_experts 8 --output_dir "$S" --max_iters 10
expect_refusal "another optimizer" "trained with --optimizer_type muon but this run has adamw" \
    $(flags adamw) --output_dir "$tmp/d3" --resume "$S/ckpt_00000010.h5"
[ "$(latest "$S")" == "ckpt_00000020.h5" ] && ok "a refused resume leaves the output directory alone" || nok "refused resume touched latest"

# --- (e, f) SIGUSR1 and SIGTERM ---
for sig in USR1 TERM; do
    e=$tmp/signal_$sig
    extra=()
    [ $sig == TERM ] && extra=(--checkpoint_interval 3 --keep_checkpoints 2)
    $bin train $(flags muon) --output_dir "$e" "${extra[@]}" >"$e.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do [ "$(cat "$e/metrics.jsonl" 2>/dev/null | grep -c '"loss"')" -ge 4 ] && break; sleep 0.05; done
    kill -$sig $pid
    wait $pid
    rc=$?
    n=$(sed -n 's/.*stopped by SIG'$sig' after \([0-9]*\) of 20 steps.*/\1/p' "$e.log")
    if [ $rc -eq 0 ] && [ -n "$n" ] && [ "$n" -lt 20 ] && [ "$(latest "$e")" == "$(printf 'ckpt_%08d.h5' "$n")" ]; then
        ok "SIG$sig: the run finishes its step, saves ckpt at step $n, exits 0"
    else
        nok "SIG$sig stop" "rc=$rc n=$n latest=$(latest "$e") $(tail -2 "$e.log")"
    fi
    $bin train $(flags muon) --output_dir "$e" "${extra[@]}" >"$e.log2" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && [ "$(steps "$e/metrics.jsonl")" == "$(steps "$S/metrics.jsonl")" ] &&
        $tool same "$e/ckpt_00000020.h5" "$S/ckpt_00000020.h5" >/dev/null; then
        ok "SIG$sig: the resumed run ends with the uninterrupted run's 20 losses and final weights"
    else
        nok "SIG$sig resume" "rc=$rc $(diff <(steps "$e/metrics.jsonl") <(steps "$S/metrics.jsonl") | head -3 | tr '\n' ' ')"
    fi
done
kept=$(cd "$tmp/signal_TERM" && ls ckpt_*.h5 | tr '\n' ' ')
[ "$kept" == "ckpt_00000018.h5 ckpt_00000020.h5 " ] && ok "--keep_checkpoints 2 keeps the two newest ($kept)" || nok "--keep_checkpoints" "$kept"

# --- the collective writer on 1, 2 and 4 ranks ---
for np in 1 2 4; do
    OMP_NUM_THREADS=1 mpirun --oversubscribe -np $np $tool write "$tmp/mpi$np" 2>&1 | grep -E '^(not )?ok - ' ||
        nok "ckpt_mpi_check under mpirun -np $np printed no results"
done
for opt in adamw muon; do
    f=$opt/split/ckpt_00000002.h5
    cmp -s "$tmp/mpi1/$f" "$tmp/mpi2/$f" && cmp -s "$tmp/mpi1/$f" "$tmp/mpi4/$f" \
        && ok "$opt: the files written by 1, 2 and 4 ranks are byte for byte the same" || nok "$opt: files of 1, 2, 4 ranks differ"
done
exit 0
