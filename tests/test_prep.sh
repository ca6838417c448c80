#!/usr/bin/env bash
# Tests of `deltamla prep`: token shards from text (byte and BPE tokenizers, documents
# by file and by blank line) on 1, 2 and 4 MPI ranks giving the same token stream and
# the same shard files; the shard layout (attributes, doc_offsets, end-of-text at the
# end of every document); BPE round trips (the merges stored in the shard decode every
# document back to its exact text); llm.c .bin and .npy uint16/uint32 imports; --force;
# the progress line; and bad input ending with one line and a non-zero exit. The shards
# are read with h5py. Prints "ok - ..." / "not ok - ..." lines.
set -u
cd "$(dirname "$0")/.."
bin=bin/deltamla
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=1

ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }

if ! python3 -c 'import h5py, numpy' 2>/dev/null; then
    nok "h5py and numpy are needed to read the shards (python3 -m pip install h5py numpy)"
    exit 1
fi

# --- a small corpus of our own: ASCII, multi-byte UTF-8, blank-line paragraphs ---
c=$tmp/corpus
mkdir -p "$c/sub/deeper"
printf 'It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\nCaf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88 \xf0\x9f\x99\x82, \xc3\xbcber \xc3\x9cbermut.\n' >"$c/a.txt"
{
    echo "However little known the feelings or views of such a man may be on his first entering a neighbourhood,"
    echo "this truth is so well fixed in the minds of the surrounding families."
    echo
    echo "  "
    printf 'My dear Mr. Bennet,\tsaid his lady to him one day, have you heard that Netherfield Park is let at last?\n'
    echo
    echo
    printf 'Mr. Bennet replied that he had not. \xce\x9a\xce\xb1\xce\xbb\xce\xb7\xce\xbc\xce\xad\xcf\x81\xce\xb1 \xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82\n'
} >"$c/sub/b.txt"
for i in 1 2 3 4 5 6; do echo "But it is, returned she; for Mrs. Long has just been here, and she told me all about it. ($i)"; done >"$c/sub/deeper/c.md"
printf 'no trailing newline, \xe2\x82\xac 100' >"$c/z.txt"
echo "hidden files are skipped" >"$c/.hidden.txt"

shard_stream() { # dir -> prints a summary line used to compare runs
    python3 - "$1" <<'EOF'
import glob, hashlib, sys, h5py, numpy as np
tok, docs = [], []
for f in sorted(glob.glob(sys.argv[1] + "/shard_*.h5")):
    with h5py.File(f, "r") as h:
        tok.append(h["tokens"][:].astype(np.int64))
        docs.append(h["doc_offsets"][:].astype(np.int64) + int(h.attrs["stream_offset"]))
        tj = h.attrs["tokenizer"]
t = np.concatenate(tok); d = np.concatenate(docs)
print(len(t), len(d), hashlib.sha256(t.tobytes() + b"|" + d.tobytes() + b"|" + tj.encode()).hexdigest())
EOF
}

# Check the layout of a prepared data set: attributes, dtype, chunking, doc_offsets,
# end-of-text at the end of every document, and (text) every document decoding to the
# text it came from. args: dir, doc_split, the source files in stream order
check_layout() {
    python3 - "$@" <<'EOF'
import glob, json, sys, h5py, numpy as np
d, split, files = sys.argv[1], sys.argv[2], sys.argv[3:]
fails = []
paths = sorted(glob.glob(d + "/shard_*.h5"))
stream, starts, tok_json, off = [], [], None, 0
for k, p in enumerate(paths):
    with h5py.File(p, "r") as h:
        a = h.attrs
        for key in ("format", "version", "vocab_size", "eot_token", "num_tokens", "num_docs", "tokenizer"):
            if key not in a: fails.append(f"{p} lacks attribute {key}")
        if a["format"] != "deltamla-tokens" or int(a["version"]) != 1: fails.append(f"{p}: format/version")
        t, o = h["tokens"], h["doc_offsets"]
        want = np.uint16 if int(a["vocab_size"]) <= 65536 else np.uint32
        if t.dtype != want or o.dtype != np.uint64 or t.chunks is None: fails.append(f"{p}: dtypes or chunking")
        if t.shape[0] != int(a["num_tokens"]) or o.shape[0] != int(a["num_docs"]): fails.append(f"{p}: counts")
        if int(a["shard_index"]) != k or int(a["num_shards"]) != len(paths) or int(a["stream_offset"]) != off:
            fails.append(f"{p}: shard_index/num_shards/stream_offset")
        if tok_json is None: tok_json = a["tokenizer"]
        if a["tokenizer"] != tok_json: fails.append(f"{p}: tokenizer differs between shards")
        eot, vocab = int(a["eot_token"]), int(a["vocab_size"])
        stream.append(t[:].astype(np.int64)); starts.extend(int(x) + off for x in o[:])
        off += t.shape[0]
s = np.concatenate(stream)
if s.max() >= vocab: fails.append("a token is outside vocab_size")
# documents: starts at 0 and after every end-of-text; every document ends with end-of-text
want_starts = [0] + [i + 1 for i in np.nonzero(s == eot)[0] if i + 1 < len(s)]
if starts != want_starts: fails.append(f"doc_offsets {starts[:8]} != starts after eot {want_starts[:8]}")
if s[-1] != eot: fails.append("the stream does not end with end-of-text")
tj = json.loads(tok_json)
pieces = [bytes([i]) for i in range(256)]
for a_, b_ in tj.get("merges", []): pieces.append(pieces[a_] + pieces[b_])
docs = [s[a_:b_] for a_, b_ in zip(starts, starts[1:] + [len(s)])]
decoded = [b"".join(pieces[x] for x in doc[:-1]) for doc in docs]
if any(x == eot for doc in docs for x in doc[:-1]): fails.append("end-of-text inside a document")
texts = []
for f in files:
    b = open(f, "rb").read()
    if split == "file":
        texts.append(b)
        continue
    cur = None
    for line in b.splitlines(keepends=True):
        if line.strip(b" \t\r\n") == b"":
            if cur is not None: texts.append(cur); cur = None
        else:
            cur = line if cur is None else cur + line
    if cur is not None: texts.append(cur)
if len(docs) != len(texts): fails.append(f"{len(docs)} documents, expected {len(texts)}")
elif decoded != texts: fails.append("a document does not decode to its text: " + repr([(x[:40], y[:40]) for x, y in zip(decoded, texts) if x != y][:1]))
print("LAYOUT", "OK" if not fails else "; ".join(fails[:4]), len(paths), len(docs), tj["kind"], vocab)
EOF
}

files_in_order=("$c/a.txt" "$c/sub/b.txt" "$c/sub/deeper/c.md" "$c/z.txt")

prep_np() { # np, outdir, flags...
    local np=$1 out=$2
    shift 2
    mpirun --oversubscribe -np "$np" $bin prep --input "$c" --output "$out" "$@" >"$out.log" 2>&1
}

# --- byte and BPE, documents by file and by blank line, on 1, 2 and 4 ranks ---
for variant in "byte file" "bpe blank_line" "bpe file"; do
    set -- $variant
    tk=$1 split=$2
    flags=(--tokenizer "$tk" --doc_split "$split" --shard_tokens 150)
    [ "$tk" = bpe ] && flags+=(--vocab_size 300)
    nps="1 2 4"
    [ "$variant" = "bpe file" ] && nps="1 2"
    ref=""
    same=1
    for np in $nps; do
        out=$tmp/${tk}_${split}_$np
        if ! prep_np "$np" "$out" "${flags[@]}"; then
            nok "prep $tk $split on $np ranks" "$(tail -3 "$out.log" | tr '\n' ' ')"
            same=0
            continue
        fi
        s=$(shard_stream "$out")
        if [ -z "$ref" ]; then
            ref=$s
            layout=$(check_layout "$out" "$split" "${files_in_order[@]}")
            if grep -q '^LAYOUT OK' <<<"$layout"; then
                ok "$tk, documents by $split: shard layout, every document ends with end-of-text and decodes to its text ($layout)"
            else
                nok "$tk, documents by $split: shard layout" "$layout"
            fi
        elif [ "$s" != "$ref" ]; then
            same=0
            nok "$tk $split: $np ranks give another stream" "$s vs $ref"
        fi
        # the shard files themselves are the same bytes whatever the rank count
        if [ "$np" != 1 ]; then
            for f in "$tmp/${tk}_${split}_1"/shard_*.h5; do
                cmp -s "$f" "$out/$(basename "$f")" || { same=0; nok "$tk $split: $(basename "$f") differs between 1 and $np ranks"; }
            done
        fi
    done
    [ $same = 1 ] && ok "$tk, documents by $split: ranks $nps give identical token streams, tokenizers and shard files ($ref)"
done

n_shards=$(ls "$tmp/byte_file_1" | grep -c '^shard_0000[0-9].h5$')
[ "$n_shards" -gt 2 ] && ok "--shard_tokens 150 cuts the byte stream into $n_shards shards" || nok "several shards expected" "$n_shards"
grep -q "merges" <(python3 -c "import h5py;print(h5py.File('$tmp/bpe_file_1/shard_00000.h5','r').attrs['tokenizer'])") &&
    ok "bpe: the merges are stored in the shard's tokenizer attribute" || nok "bpe merges stored in the shard"

# --- imports: llm.c .bin and .npy uint16 / uint32 give the same tokens ---
imp=$tmp/imp
mkdir -p "$imp/bin" "$imp/npy16" "$imp/npy32"
python3 - "$imp" <<'EOF'
import sys, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(7)
# llm.c style: every document starts with end-of-text 50256
parts = []
for n in (40, 7, 120, 3):
    parts += [50256] + list(rng.integers(0, 50256, n))
toks = np.array(parts, dtype=np.int64)
half = len(toks) // 2
for i, chunk in enumerate((toks[:half], toks[half:])):
    hdr = np.zeros(256, dtype=np.int32); hdr[0] = 20240520; hdr[1] = 1; hdr[2] = len(chunk)
    with open(f"{d}/bin/part{i}.bin", "wb") as f:
        f.write(hdr.tobytes()); f.write(chunk.astype(np.uint16).tobytes())
    np.save(f"{d}/npy16/part{i}.npy", chunk.astype(np.uint16))
    np.save(f"{d}/npy32/part{i}.npy", chunk.astype(np.uint32))
np.save(f"{d}/expected.npy", toks)
EOF
import_stream() { # dir -> "OK n docs" when the tokens and doc_offsets match expected.npy
    python3 - "$1" "$imp/expected.npy" <<'EOF'
import glob, json, sys, h5py, numpy as np
want = np.load(sys.argv[2])
t, starts = [], []
for f in sorted(glob.glob(sys.argv[1] + "/shard_*.h5")):
    with h5py.File(f, "r") as h:
        t.append(h["tokens"][:].astype(np.int64)); starts += [int(x) + int(h.attrs["stream_offset"]) for x in h["doc_offsets"][:]]
        a = dict(h.attrs)
s = np.concatenate(t)
want_starts = [0] + [i + 1 for i in np.nonzero(s == 50256)[0] if i + 1 < len(s)]
good = (np.array_equal(s, want) and starts == want_starts and int(a["vocab_size"]) == 50257 and int(a["eot_token"]) == 50256
        and json.loads(a["tokenizer"])["kind"] == "imported")
print("OK" if good else "BAD", len(s), len(starts))
EOF
}
for kind in bin npy16 npy32; do
    out=$tmp/imp_$kind
    if mpirun --oversubscribe -np 2 $bin prep --input "$imp/$kind" --output "$out" --shard_tokens 100 >"$out.log" 2>&1; then
        r=$(import_stream "$out")
        grep -q '^OK' <<<"$r" && ok "import $kind on 2 ranks: the tokens as they were, documents cut after end-of-text ($r)" ||
            nok "import $kind" "$r"
    else
        nok "import $kind" "$(tail -2 "$out.log" | tr '\n' ' ')"
    fi
done

# --- --force replaces the shards of an earlier run, stale ones included ---
if $bin prep --input "$c" --output "$tmp/byte_file_1" --force --shard_tokens 100000 >/dev/null 2>&1 &&
    [ "$(ls "$tmp/byte_file_1" | grep -c '^shard_')" = 1 ]; then
    ok "--force: an output directory with shards is replaced, stale shards removed"
else
    nok "--force replaces the shards" "$(ls "$tmp/byte_file_1" | tr '\n' ' ')"
fi

# --- progress line ---
err=$(mpirun --oversubscribe -np 2 $bin prep --input "$c" --output "$tmp/progress" --progress_interval 0 2>&1 >/dev/null)
grep -qE '^prep: encoding [0-9.]+ MB of [0-9.]+ MB, [0-9.]+ MB/s, [0-9.]+ M tokens/s$' <<<"$err" &&
    ok "progress line: $(grep -m1 '^prep: encoding' <<<"$err")" || nok "progress line" "$err"

# --- bad input: one line naming the problem, non-zero exit, nothing written ---
expect_error() { # description, expected text (grep -E), args...
    local what=$1 want=$2
    shift 2
    local err rc lines
    err=$($bin prep "$@" 2>&1 >/dev/null)
    rc=$?
    lines=$(printf '%s' "$err" | grep -c '')
    if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -qE -e "$want" <<<"$err"; then
        ok "bad input: $what -> $err"
    else
        nok "bad input: $what" "rc=$rc lines=$lines stderr=[$err]"
    fi
}
bad=$tmp/bad
mkdir -p "$bad/utf8" "$bad/empty" "$bad/mixed"
printf 'good text\nthen a bad byte \xff here\n' >"$bad/utf8/x.txt"
printf 'an overlong slash \xc0\xaf\n' >"$bad/overlong.txt"
: >"$bad/empty/nothing.txt"
printf '\n  \n\t\n' >"$bad/blank.txt"
python3 - "$bad" <<'EOF'
import sys, numpy as np
d = sys.argv[1]
hdr = np.zeros(256, dtype=np.int32); hdr[0] = 12345; hdr[1] = 1; hdr[2] = 2
open(f"{d}/magic.bin", "wb").write(hdr.tobytes() + np.array([1, 2], np.uint16).tobytes())
hdr[0] = 20240520; hdr[2] = 5
open(f"{d}/short.bin", "wb").write(hdr.tobytes() + np.array([1, 2], np.uint16).tobytes())
np.save(f"{d}/float.npy", np.zeros(4, np.float32))
np.save(f"{d}/twod.npy", np.zeros((2, 3), np.uint16))
np.save(f"{d}/big.npy", np.array([1, 70000], np.uint32))
open(f"{d}/mixed/a.txt", "w").write("text\n")
hdr[2] = 2
open(f"{d}/mixed/b.bin", "wb").write(hdr.tobytes() + np.array([1, 2], np.uint16).tobytes())
EOF
o=$tmp/never
expect_error "invalid UTF-8" "$bad/utf8/x.txt is not valid UTF-8 at byte offset 26" --input "$bad/utf8" --output "$o"
expect_error "overlong UTF-8 (bpe)" "overlong.txt is not valid UTF-8 at byte offset 18" --input "$bad/overlong.txt" --output "$o" --tokenizer bpe --vocab_size 300
expect_error "empty corpus" "empty corpus" --input "$bad/empty" --output "$o"
expect_error "blank lines only" "empty corpus: the inputs hold no text" --input "$bad/blank.txt" --output "$o" --doc_split blank_line
expect_error "bpe vocab 200" "vocab too small: --vocab_size 200" --input "$c" --output "$o" --tokenizer bpe --vocab_size 200
expect_error "bpe without a vocab size" "needs --vocab_size" --input "$c" --output "$o" --tokenizer bpe
expect_error "missing file" "cannot open input $tmp/missing.txt: No such file or directory" --input "$tmp/missing.txt" --output "$o"
expect_error "output exists without --force" "output directory $tmp/byte_file_2 exists and is not empty .*--force" --input "$c" --output "$tmp/byte_file_2"
expect_error "bad .bin magic" "magic.bin: not an llm.c token file \(magic 12345, expected 20240520\)" --input "$bad/magic.bin" --output "$o"
expect_error ".bin shorter than its header says" "short.bin: the llm.c header says 5 tokens" --input "$bad/short.bin" --output "$o"
expect_error ".npy float dtype" "float.npy: .npy dtype '<f4' is not uint16 or uint32" --input "$bad/float.npy" --output "$o"
expect_error ".npy 2-D" "twod.npy: .npy array shape \(2, 3\) is not 1-D" --input "$bad/twod.npy" --output "$o"
expect_error "token outside the vocabulary" "big.npy: token 70000 at position 1 is not below --vocab_size 50257" --input "$bad/big.npy" --output "$o"
expect_error "text mixed with tokens" "cannot mix text" --input "$bad/mixed" --output "$o"
expect_error "unknown flag" "unknown flag --vocab" --input "$c" --output "$o" --vocab 300
expect_error "bad choice" "--doc_split 'lines' is not one of: file blank_line" --input "$c" --output "$o" --doc_split lines
[ -e "$o" ] && nok "bad input wrote $o" || ok "bad input writes nothing"

# under mpirun the first problem in file order is still printed once
printf 'fine\n' >"$bad/utf8/a.txt"
printf 'also \xfe bad\n' >"$bad/utf8/y.txt"
err=$(mpirun --oversubscribe -np 3 $bin prep --input "$bad/utf8" --output "$o" 2>&1)
rc=$?
n=$(grep -c 'deltamla: error:' <<<"$err")
if [ $rc -ne 0 ] && [ "$n" = 1 ] && grep -q "x.txt is not valid UTF-8 at byte offset 26" <<<"$err"; then
    ok "bad input on 3 ranks: one error line, the first bad file in order"
else
    nok "bad input on 3 ranks" "rc=$rc errors=$n: $err"
fi
