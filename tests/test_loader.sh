#!/usr/bin/env bash
# Tests of the HDF5 token-shard loader (io/loader.c) on shards written by h5py in the
# documented format (variable-length string attributes, as Python tools write them):
# the rows it yields are exactly the rows python cuts from the concatenated stream, each
# once per epoch; uint32 shards; several ranks under mpirun; the synchronous path (MPI
# without MPI_THREAD_MULTIPLE); bad input ending with one line that names the file.
# Drives build/tests/test_loader (tests/test_loader.c). Prints "ok - ..." / "not ok - ...".
set -u
cd "$(dirname "$0")/.."
prog=build/tests/test_loader
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }
if [ ! -x "$prog" ]; then
    nok "$prog is not built (make build/tests/test_loader)"
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
T=64

# ---- shard sets, good and bad ----
python3 - "$tmp" "$T" <<'EOF' || { nok "writing shards with h5py"; exit 1; }
import json, os, shutil, sys
import h5py, numpy as np

tmp, T = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(5)
tok = json.dumps({"kind": "bpe", "vocab_size": 50257, "merges": ["a b", "ab c"]})

def shard(path, tokens, vocab=50257, eot=50256, tokenizer=tok, dtype=None, skip=(), over=None, docs=None):
    over = over or {}
    dtype = dtype or (np.uint16 if vocab <= 65536 else np.uint32)
    with h5py.File(path, "w") as f:
        if "tokens" not in skip:
            f.create_dataset("tokens", data=np.asarray(tokens, dtype=dtype), chunks=(256,), maxshape=(None,))
        starts = np.flatnonzero(np.asarray(tokens) == eot) + 1 if docs is None else np.asarray(docs)
        starts = np.concatenate([[0], starts[starts < len(tokens)]]).astype(np.uint64)
        f.create_dataset("doc_offsets", data=starts)
        attrs = {"format": "deltamla-tokens", "version": 1, "vocab_size": vocab, "eot_token": eot,
                 "num_tokens": len(tokens), "num_docs": len(starts), "tokenizer": tokenizer}
        attrs.update(over)
        for k, v in attrs.items():
            if k not in skip:
                f.attrs[k] = v

def shard_set(d, stream, cuts, **kw):
    os.makedirs(d, exist_ok=True)
    bounds = [0] + cuts + [len(stream)]
    for i in range(len(bounds) - 1):
        shard(f"{d}/part_{i:04d}.h5", stream[bounds[i]:bounds[i + 1]], **kw)

# the good set: documents of random length ended by the end-of-text token; cuts that
# fall inside rows (one row spans three shards) and an empty shard; files that are not
# shards (another suffix, a hidden writer's temporary) lie beside them
n = 20011
stream = rng.integers(0, 50256, n).astype(np.int64)
stream[rng.random(n) < 0.01] = 50256
np.save(f"{tmp}/stream.npy", stream)
shard_set(f"{tmp}/good", stream, [3000, 3000, 3010, 3040, 12345])
open(f"{tmp}/good/README.txt", "w").write("not a shard\n")
open(f"{tmp}/good/.part_9999.h5", "w").write("a writer's temporary\n")

wide = rng.integers(0, 100000, 7777).astype(np.int64)
np.save(f"{tmp}/wide.npy", wide)
shard(f"{tmp}/wide.h5", wide, vocab=100000, eot=99999)

# bad inputs, one problem each
good = stream[:1000]
def bad(name, **kw):
    os.makedirs(f"{tmp}/bad/{name}")
    shard(f"{tmp}/bad/{name}/a.h5", good)
    shard(f"{tmp}/bad/{name}/b.h5", good, **kw)
os.makedirs(f"{tmp}/bad/empty")
open(f"{tmp}/bad/empty/notes.txt", "w").write("no shards here\n")
os.makedirs(f"{tmp}/bad/text")
open(f"{tmp}/bad/text/x.h5", "w").write("plain text, not HDF5\n" * 10)
os.makedirs(f"{tmp}/bad/damaged")
shard(f"{tmp}/bad/damaged/x.h5", good)
data = open(f"{tmp}/bad/damaged/x.h5", "rb").read()
open(f"{tmp}/bad/damaged/x.h5", "wb").write(data[:1200])
bad("format", over={"format": "llm.c-tokens"})
bad("noformat", skip=("format",))
bad("version", over={"version": 2})
bad("floatversion", over={"version": 1.0})
bad("nodocs", skip=("num_docs",))
bad("vocab", vocab=50304, eot=50256, over={"vocab_size": 50304})
bad("eot", over={"eot_token": 0})
bad("tokenizer", tokenizer=json.dumps({"kind": "byte"}))
bad("numtokens", over={"num_tokens": 999})
bad("notokens", skip=("tokens",))
bad("docs", over={"num_docs": 3})
bad("narrow", vocab=70000, eot=69999, dtype=np.uint16)
bad("outside", over={})
with h5py.File(f"{tmp}/bad/outside/b.h5", "a") as f:
    f["tokens"][500] = 60000
os.makedirs(f"{tmp}/bad/short")
shard(f"{tmp}/bad/short/a.h5", good[:30])
shard(f"{tmp}/bad/short/b.h5", good[:30])
EOF

# ---- the fields ----
out=$($prog --open "$tmp/good" $T 0.1 train 2>&1)
rows=$(((20011 - 1) / T))
train=$(python3 -c "r=$rows; print(r - int(r * 0.1))")
if grep -q "^kind=shards num_tokens=20011 num_rows=$train vocab_size=50257 eot_token=50256 max_token=50256$" <<<"$out" &&
    grep -qF 'tokenizer={"kind": "bpe", "vocab_size": 50257, "merges": ["a b", "ab c"]}' <<<"$out"; then
    ok "h5py shard set (6 files, one empty, README and hidden file beside): 20011 tokens, $train train rows, vocab, eot, tokenizer"
else
    nok "h5py shard set fields" "$(tr '\n' ' ' <<<"$out")"
fi

# ---- rows against python: each epoch is a permutation of exactly the split's rows ----
check_rows() { # description, dump file, stream.npy, first row, rows, epochs
    python3 - "$@" <<'EOF'
import sys
import numpy as np
what, dump, npy, first, n, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
T = int(sys.argv[7])
stream = np.load(npy)
want = sorted(tuple(stream[r * T:r * T + T + 1]) for r in range(first, first + n))
got = np.loadtxt(dump, dtype=np.int64, ndmin=2)
ok = len(got) == n * epochs
orders = []
for e in range(epochs):
    rows = got[e * n:(e + 1) * n]
    ok = ok and (rows[:, 0] == e).all() and sorted(tuple(r) for r in rows[:, 1:]) == want
    orders.append([tuple(r) for r in rows[:, 1:]])
ok = ok and all(orders[e] != orders[0] for e in range(1, epochs))
print(("ok - " if ok else "not ok - ") + what)
EOF
}
$prog --dump "$tmp/good" $T 1 $((3 * train)) 0.1 train >"$tmp/train.txt" 2>"$tmp/err.txt" &&
    check_rows "train split: 3 epochs, each a new order of exactly python's $train rows of the stream (rows straddling shards included)" \
        "$tmp/train.txt" "$tmp/stream.npy" 0 $train 3 $T || nok "dump train split" "$(head -c 300 "$tmp/err.txt")"
val=$((rows - train))
$prog --dump "$tmp/good" $T 1 $((2 * val)) 0.1 val >"$tmp/val.txt" 2>"$tmp/err.txt" &&
    check_rows "val split: 2 epochs, each exactly python's last $val rows" "$tmp/val.txt" "$tmp/stream.npy" $train $val 2 $T ||
    nok "dump val split" "$(head -c 300 "$tmp/err.txt")"
wrows=$(((7777 - 1) / T))
$prog --dump "$tmp/wide.h5" $T 1 $((2 * wrows)) 0 train >"$tmp/wide.txt" 2>"$tmp/err.txt" &&
    check_rows "uint32 shard (vocab 100000): 2 epochs, each exactly python's $wrows rows" "$tmp/wide.txt" "$tmp/wide.npy" 0 $wrows 2 $T ||
    nok "dump uint32 shard" "$(head -c 300 "$tmp/err.txt")"

# ---- ranks ----
for np in 2 4; do
    for split in train val; do
        out=$(timeout 300 mpirun --oversubscribe -np $np $prog --ranks "$tmp/good" $T 3 100 0.1 $split 2>&1)
        rc=$?
        line=$(grep -E '^(not )?ok - ' <<<"$out")
        if [ -n "$line" ]; then
            echo "$line" | sed "s/^\(not \)\{0,1\}ok - /&mpirun -np $np: /"
            [ $rc -eq 0 ] || grep -q '^not ok' <<<"$line" || nok "mpirun -np $np --ranks ($split) exited with status $rc"
        else
            nok "mpirun -np $np --ranks ($split)" "exit $rc: $(tail -3 <<<"$out" | tr '\n' ' ')"
        fi
    done
done

# ---- the synchronous path: MPI_Init without MPI_THREAD_MULTIPLE ----
out=$($prog --single 2>&1)
rc=$?
grep -E '^(not )?ok - ' <<<"$out" | sed 's/^\(not \)\{0,1\}ok - /&synchronous reads: /'
grep '^# loader' <<<"$out"
[ $rc -eq 0 ] || nok "test_loader --single exited with status $rc"

# ---- bad input: one line naming the problem (and the file), non-zero exit ----
expect_error() { # description, expected text (grep -E), args...
    local what=$1 want=$2
    shift 2
    local err rc lines
    err=$($prog "$@" 2>&1 >/dev/null)
    rc=$?
    lines=$(printf '%s' "$err" | grep -c '')
    if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -qE -e "$want" <<<"$err"; then
        ok "bad input: $what -> ${err#deltamla: error: }"
    else
        nok "bad input: $what" "exit $rc, $lines line(s): $(head -c 400 <<<"$err" | tr '\n' '|')"
    fi
}
b=$tmp/bad
expect_error "missing path" "^deltamla: error: cannot open data set $tmp/nope: No such file" --open "$tmp/nope" $T 0 train
expect_error "directory without shards" "data directory $b/empty holds no token shards" --open "$b/empty" $T 0 train
expect_error "not HDF5" "shard $b/text/x.h5 is not an HDF5 file" --open "$b/text" $T 0 train
expect_error "truncated HDF5 file" "shard $b/damaged/x.h5 is an HDF5 file that HDF5 cannot open \(truncated file" --open "$b/damaged" $T 0 train
expect_error "wrong format attribute" "shard $b/format/b.h5 has format \"llm.c-tokens\", not \"deltamla-tokens\"" --open "$b/format" $T 0 train
expect_error "no format attribute" "shard $b/noformat/b.h5 has no format attribute" --open "$b/noformat" $T 0 train
expect_error "version 2" "shard $b/version/b.h5 has format version 2" --open "$b/version" $T 0 train
expect_error "version not an integer" "shard $b/floatversion/b.h5: attribute version is not an integer" --open "$b/floatversion" $T 0 train
expect_error "missing num_docs" "shard $b/nodocs/b.h5 has no num_docs attribute" --open "$b/nodocs" $T 0 train
expect_error "vocab differs between shards" "shard $b/vocab/b.h5 has vocab_size 50304 but $b/vocab/a.h5 has 50257" --open "$b/vocab" $T 0 train
expect_error "eot differs between shards" "shard $b/eot/b.h5 has eot_token 0 but $b/eot/a.h5 has 50256" --open "$b/eot" $T 0 train
expect_error "tokenizer differs between shards" "shard $b/tokenizer/b.h5 has a different tokenizer than $b/tokenizer/a.h5" --open "$b/tokenizer" $T 0 train
expect_error "num_tokens != /tokens length" "shard $b/numtokens/b.h5: /tokens holds 1000 tokens but num_tokens says 999" --open "$b/numtokens" $T 0 train
expect_error "no /tokens" "shard $b/notokens/b.h5 has no /tokens dataset" --open "$b/notokens" $T 0 train
expect_error "/doc_offsets length != num_docs" "shard $b/docs/b.h5: /doc_offsets holds [0-9]+ entries but num_docs says 3" --open "$b/docs" $T 0 train
expect_error "uint16 tokens for vocab 70000" "shard $b/narrow/b.h5: /tokens is uint16 but vocab_size 70000 calls for uint32" --open "$b/narrow" $T 0 train
expect_error "stream shorter than a row" "data set $b/short holds 60 tokens, fewer than one row of --block_size $T \+ 1" --open "$b/short" $T 0 train
expect_error "val_fraction leaving no training rows" "data set $tmp/good: --val_fraction 1 leaves no training rows" --open "$tmp/good" $T 1 train
expect_error "token outside the vocabulary (found when read)" "shard $b/outside/b.h5 holds token 60000 at position 500, outside its vocab_size 50257" \
    --dump "$b/outside" 10 8 100 0 train
