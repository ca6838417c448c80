#!/usr/bin/env bash
# Tests of `deltamla ckpt info|verify|export|import` against a real training run and
# the PyTorch reference (tests/reference/): the exported folder must give the reference
# the same loss as deltamla computes on the checkpoint (build/tests/ckpt_loss), a file
# written in Python under the reference's names must import and give the same loss,
# and damaged or foreign inputs must be refused with one line naming the problem.
# Prints "ok - ..." / "not ok - ..." lines.
set -u
cd "$(dirname "$0")/.."
bin=bin/deltamla
loss_tool=build/tests/ckpt_loss
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { echo "ok - $1"; }
nok() { echo "not ok - $1${2:+: $2}"; }
one_line() { [ "$(printf '%s' "$1" | grep -c '')" -eq 1 ]; }

for tool in "$bin" "$loss_tool"; do
    [ -x "$tool" ] || { nok "ckpt tool: $tool is not built (make tests-build)"; exit 1; }
done

# a small text of our own: the test needs no download
data=$tmp/text.txt
for i in $(seq 1 80); do
    echo "Whan that Aprille with his shoures soote the droghte of March hath perced to the roote, $i"
done >"$data"

# --- a real run: tiny model on byte-tokenizer shards (so the checkpoint carries a
# tokenizer), 4 steps, a checkpoint every 2 ---
if ! $bin prep --input "$data" --output "$tmp/shards" --tokenizer byte >"$tmp/prep.log" 2>&1; then
    nok "ckpt tool: deltamla prep of the test text failed" "$(tail -3 "$tmp/prep.log" | tr '\n' ' ')"
    exit 1
fi
model_flags="--size tiny --block_size 32"
train_flags="$model_flags --data $tmp/shards --batch_size 2 --learning_rate 3e-3 --warmup_iters 1 --log_interval 1 --device cpu"
if ! $bin train $train_flags --max_iters 4 --checkpoint_interval 2 --output_dir "$tmp/run" >"$tmp/train.log" 2>&1; then
    nok "ckpt tool: training the tiny model with --checkpoint_interval 2 failed" "$(tail -3 "$tmp/train.log" | tr '\n' ' ')"
    exit 1
fi
ckpt=$(ls "$tmp"/run/ckpt_*.h5 2>/dev/null | sort | tail -1)
[ -n "$ckpt" ] || { nok "ckpt tool: the run wrote no checkpoint" "$(ls "$tmp/run" | tr '\n' ' ')"; exit 1; }

# --- info ---
out=$($bin ckpt info "$tmp/run" 2>&1)
rc=$?
if [ $rc -eq 0 ] && grep -qE '^step +4$' <<<"$out" && grep -qE '^checksums +ok' <<<"$out" &&
    grep -qE '^tokenizer +byte \(vocab 257' <<<"$out" && grep -qE '^model +size tiny: 3 layers' <<<"$out" &&
    grep -qE 'transformer\.h\.2\.ffn\.experts\.gate_up_weight +\[8, 32, 64\] +16384 +ok' <<<"$out" &&
    grep -qE 'transformer\.h\.0\.attn\.q_conv\.conv\.weight +\[64, 1, 4\]' <<<"$out"; then
    ok "ckpt info DIR: step 4, config summary, tokenizer, every tensor with shape and checksum status"
else
    nok "ckpt info DIR" "rc=$rc $(head -12 <<<"$out" | tr '\n' '|')"
fi
names=$($bin info $model_flags | awk '/^  transformer\./{print $1}')
missing_names=$(while read -r n; do grep -qE "^  $n " <<<"$out" || echo "$n"; done <<<"$names")
n_names=$(grep -c '' <<<"$names")
[ "$n_names" -gt 40 ] && [ -z "$missing_names" ] && grep -qE '^  transformer\.h\.2\.ffn\.router\.expert_bias +\[8\] +8 +ok' <<<"$out" \
    && ok "ckpt info lists all $n_names parameter tensors and the router bias" \
    || nok "ckpt info lists every tensor" "missing: $(tr '\n' ' ' <<<"$missing_names")"
out=$($bin ckpt info "$ckpt" 2>&1) && grep -qE '^step +4$' <<<"$out" && ok "ckpt info FILE" || nok "ckpt info FILE" "$out"

# --- verify ---
out=$($bin ckpt verify "$tmp/run" 2>&1)
rc=$?
[ $rc -eq 0 ] && grep -q '^ok ' <<<"$out" && ok "ckpt verify on a good checkpoint: $out" || nok "ckpt verify good" "rc=$rc $out"
first=$(ls "$tmp"/run/ckpt_*.h5 | sort | head -1)
$bin ckpt verify "$first" >/dev/null 2>&1 && ok "ckpt verify on the step-2 checkpoint" || nok "ckpt verify step 2"

# --- export ---
hf=$tmp/hf
out=$($bin ckpt export "$tmp/run" --out "$hf" 2>&1)
rc=$?
if [ $rc -eq 0 ] && [ -s "$hf/model.safetensors" ] && [ -s "$hf/config.json" ] && [ -s "$hf/README.md" ] &&
    [ -s "$hf/tokenizer.json" ]; then
    ok "ckpt export writes model.safetensors, config.json, tokenizer.json, README.md"
else
    nok "ckpt export" "rc=$rc $out; $(ls "$hf" 2>&1 | tr '\n' ' ')"
fi
grep -q 'lm_head.weight' "$hf/README.md" && grep -q 'tied' "$hf/README.md" && ok "export README says lm_head.weight is tied and omitted" \
    || nok "export README mentions the tied head"
err=$($bin ckpt export "$tmp/run" --out "$hf" 2>&1 >/dev/null)
rc=$?
[ $rc -ne 0 ] && one_line "$err" && grep -q 'not empty' <<<"$err" && ok "export refuses a non-empty folder: $err" \
    || nok "export refuses a non-empty folder" "rc=$rc [$err]"
out=$($bin ckpt export "$tmp/run" --out "$hf" --force 2>&1) && ok "export --force writes into it" || nok "export --force" "$out"

# --- the Python side: one helper script for everything the reference computes ---
cat >"$tmp/helper.py" <<'PY'
"""Helper of test_ckpt_tool.sh: the PyTorch reference side.
  helper.py batch OUT CONFIG                    a fixed batch as text for ckpt_loss
  helper.py check FOLDER                        names/shapes of an export vs the reference
  helper.py loss CONFIG BATCH FILE [FILE...]    reference CE loss on each safetensors file
  helper.py files FOLDER OUTDIR                 files to import (good and broken)
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.getcwd(), "tests", "reference"))
import safetensors_np  # noqa: E402
from model_ref import ModelRef, init_params, param_shapes, router_bias_shapes  # noqa: E402

torch.set_num_threads(1)
BUFFERS = (".router.expert_bias", ".router.load_history", ".router.update_count")


def save_bf16(path, tensors):
    """safetensors with every float32 tensor stored as BF16 (its upper 16 bits), which
    numpy has no dtype for, so the file is assembled here."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype == np.float32:
            dt, data = "BF16", (a.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            dt, data = {np.dtype(np.int64): "I64"}[a.dtype], a.astype("<i8").tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def bf16_round(a):
    return ((a.view(np.uint32) >> 16) << 16).view(np.float32) if a.dtype == np.float32 else a


def read_batch(path):
    nums = open(path).read().split()
    B, T = int(nums[0]), int(nums[1])
    v = np.array([int(x) for x in nums[2:]], dtype=np.int64)
    return v[:B * T].reshape(B, T), v[B * T:].reshape(B, T)


def main():
    cmd = sys.argv[1]
    if cmd == "batch":
        cfg = json.load(open(sys.argv[3]))
        B, T = 2, cfg["block_size"]
        rng = np.random.default_rng(1234)
        inputs = rng.integers(0, 256, size=(B, T))
        targets = rng.integers(0, 256, size=(B, T))
        targets[:, ::5] = -100  # the ignore index must be honoured by both
        with open(sys.argv[2], "w") as f:
            f.write(f"{B} {T}\n" + " ".join(map(str, inputs.ravel())) + "\n" + " ".join(map(str, targets.ravel())) + "\n")
    elif cmd == "check":
        folder = sys.argv[2]
        cfg = json.load(open(os.path.join(folder, "config.json")))
        st = safetensors_np.load(os.path.join(folder, "model.safetensors"))
        want = dict(param_shapes(cfg))
        want.update(router_bias_shapes(cfg))
        have = {n: tuple(a.shape) for n, a in st.items()}
        problems = [f"missing {n}" for n in want if n not in have]
        problems += [f"unexpected {n}" for n in have if n not in want]
        problems += [f"{n} {have[n]} != {tuple(want[n])}" for n in want if n in have and have[n] != tuple(want[n])]
        problems += [f"{n} is {a.dtype}" for n, a in st.items() if a.dtype != np.float32]
        bias = [a for n, a in st.items() if n.endswith(".router.expert_bias")]
        if not bias or not any(np.any(b != 0) for b in bias):
            problems.append("the router biases are all zero after training (not exported?)")
        print("; ".join(problems) if problems else f"{len(want)} tensors")
        sys.exit(1 if problems else 0)
    elif cmd == "loss":
        cfg = json.load(open(sys.argv[2]))
        inputs, targets = read_batch(sys.argv[3])
        for path in sys.argv[4:]:
            st = safetensors_np.load(path)
            params = {n: a for n, a in st.items() if not n.endswith(BUFFERS) and n != "lm_head.weight"}
            biases = {n: a for n, a in st.items() if n.endswith(".router.expert_bias")}
            with torch.no_grad():
                ce, zl, _ = ModelRef(cfg, params, biases).forward(inputs, targets)
            print(f"{float(ce):.12g} {float(zl):.12g}")
    elif cmd == "files":
        folder, out = sys.argv[2], sys.argv[3]
        cfg = json.load(open(os.path.join(folder, "config.json")))
        params, biases = init_params(cfg, seed=7)
        rng = np.random.default_rng(8)
        for n in biases:  # nonzero, so that a bias read wrongly changes the loss
            biases[n] = (rng.integers(-3, 4, size=biases[n].shape) * 1e-3).astype(np.float32)
        full = dict(params)
        full.update(biases)
        E = next(iter(biases.values())).shape[0]
        for n in biases:  # what a PyTorch state_dict also holds: ignored on import
            full[n.replace("expert_bias", "load_history")] = np.ones(E, np.float32)
            full[n.replace("expert_bias", "update_count")] = np.array(5, np.int64)
        full["lm_head.weight"] = params["transformer.wte.weight"].copy()
        safetensors_np.save(os.path.join(out, "ref.safetensors"), full)

        def variant(name, change):
            d = dict(full)
            change(d)
            safetensors_np.save(os.path.join(out, name + ".safetensors"), d)

        variant("missing", lambda d: d.pop("transformer.h.2.attn.wkv_b.weight"))
        variant("misshaped", lambda d: d.update({"transformer.h.0.attn.q_proj.weight": np.zeros((60, 64), np.float32)}))
        variant("extra", lambda d: d.update({"transformer.h.1.attn.r_proj.weight": np.zeros((64, 64), np.float32)}))
        variant("lmhead", lambda d: d.update({"lm_head.weight": d["lm_head.weight"] + 1}))
        variant("nobias", lambda d: [d.pop(n) for n in biases])
        variant("f16", lambda d: d.update({n: a.astype(np.float16) for n, a in d.items() if a.dtype == np.float32}))
        variant("int", lambda d: d.update({"transformer.ln_f.weight": np.ones(64, np.int32)}))
        raw = open(os.path.join(out, "ref.safetensors"), "rb").read()
        open(os.path.join(out, "truncated.safetensors"), "wb").write(raw[:len(raw) // 2])
        # hand-made headers the reader must refuse
        def raw_file(name, header, nbytes=512):
            h = header.encode()
            open(os.path.join(out, name + ".safetensors"), "wb").write(len(h).to_bytes(8, "little") + h + bytes(nbytes))
        e = '"transformer.ln_f.weight":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}'
        raw_file("badjson", "{" + e + ",}}")
        raw_file("overlap", "{" + e + ',"x":{"dtype":"F32","shape":[2],"data_offsets":[128,136]}}')
        raw_file("dupe", "{" + e + "," + e + "}")
        raw_file("dtype", '{"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}}')
        raw_file("size", '{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,128]}}')
        save_bf16(os.path.join(out, "bf16.safetensors"), full)
        # the reference's loss on the F16 and BF16 weights is computed from them as stored
        no_bias = {n: a for n, a in full.items() if not n.endswith(BUFFERS)}
        no_bias.update(biases)
        safetensors_np.save(os.path.join(out, "ref_f16_as_f32.safetensors"),
                            {n: a.astype(np.float16).astype(np.float32) if a.dtype == np.float32 else a
                             for n, a in no_bias.items()})
        safetensors_np.save(os.path.join(out, "ref_bf16_as_f32.safetensors"),
                            {n: bf16_round(a) for n, a in no_bias.items()})
        safetensors_np.save(os.path.join(out, "ref_nobias.safetensors"),
                            {n: a for n, a in full.items() if not n.endswith(BUFFERS)})


main()
PY
py() { python3 "$tmp/helper.py" "$@"; }

out=$(py check "$hf" 2>&1) && ok "export: names, shapes and dtypes are the reference's, router biases included ($out)" \
    || nok "export: names and shapes" "$out"

# --- the same loss: reference on the exported folder, deltamla on the checkpoint ---
py batch "$tmp/batch.txt" "$hf/config.json" || nok "writing the batch"
# rel(a, b) prints |a-b|/|b|; ok when below the tolerance
rel_ok() { python3 -c "import sys; a, b, t = map(float, sys.argv[1:]); e = abs(a - b) / abs(b); print(f'{e:.2g}'); sys.exit(0 if e <= t else 1)" "$@"; }
c_loss() { "$loss_tool" "$1" "$tmp/batch.txt" 2>&1 | awk '/^loss /{print $2}'; }
ref=$(py loss "$hf/config.json" "$tmp/batch.txt" "$hf/model.safetensors" 2>&1 | awk '{print $1}')
mine=$(c_loss "$tmp/run")
if [ -n "$mine" ] && e=$(rel_ok "$mine" "$ref" 1e-4); then
    ok "exported weights: reference loss $ref = deltamla loss $mine on the checkpoint (rel err $e)"
else
    nok "exported weights give the reference deltamla's loss" "reference [$ref] deltamla [$mine]"
fi

# --- import ---
mkdir -p "$tmp/files"
py files "$hf" "$tmp/files" || nok "writing the import files"
F=$tmp/files
out=$($bin ckpt import "$F/ref.safetensors" --out "$tmp/imp" $model_flags 2>&1)
rc=$?
if [ $rc -eq 0 ] && ! grep -q 'warning' <<<"$out" && [ -n "$(ls "$tmp"/imp/ckpt_*.h5 2>/dev/null)" ]; then
    ok "import of a file written by Python (with lm_head, load_history, update_count): $(tail -1 <<<"$out")"
else
    nok "import of a Python-written file" "rc=$rc $out"
fi
refs=$(py loss "$hf/config.json" "$tmp/batch.txt" "$F/ref.safetensors" "$F/ref_f16_as_f32.safetensors" \
    "$F/ref_bf16_as_f32.safetensors" "$F/ref_nobias.safetensors" 2>&1 | awk '{print $1}')
read -r ref_a ref_f16 ref_bf16 ref_nobias <<<"$(tr '\n' ' ' <<<"$refs")"
mine=$(c_loss "$tmp/imp")
if [ -n "$mine" ] && e=$(rel_ok "$mine" "$ref_a" 1e-4); then
    ok "imported weights: deltamla loss $mine = reference loss $ref_a (rel err $e)"
else
    nok "imported weights give the reference's loss" "reference [$ref_a] deltamla [$mine]"
fi
$bin ckpt verify "$tmp/imp" >/dev/null 2>&1 && grep -qE '^step +0$' <<<"$($bin ckpt info "$tmp/imp")" \
    && ok "the imported checkpoint verifies and is at step 0" || nok "imported checkpoint verifies at step 0"

# export -> import round trip: the same weights bit for bit, hence the same loss digits
out=$($bin ckpt import "$hf/model.safetensors" --config "$hf/config.json" --tokenizer "$hf/tokenizer.json" \
    --out "$tmp/rt" 2>&1)
rc=$?
a=$("$loss_tool" "$tmp/run" "$tmp/batch.txt" 2>&1)
b=$("$loss_tool" "$tmp/rt" "$tmp/batch.txt" 2>&1)
[ $rc -eq 0 ] && [ -n "$a" ] && [ "$a" == "$b" ] && ok "export then import (--config config.json --tokenizer tokenizer.json): identical loss and z-loss ($b)" \
    || nok "export/import round trip" "rc=$rc $out; before [$a] after [$b]"
tok_a=$($bin ckpt info "$tmp/run" | grep '^tokenizer')
tok_b=$($bin ckpt info "$tmp/rt" | grep '^tokenizer')
[ "$tok_a" == "$tok_b" ] && ok "round trip keeps the tokenizer ($tok_b)" || nok "round trip keeps the tokenizer" "[$tok_a] [$tok_b]"
if $bin ckpt export "$tmp/rt" --out "$tmp/hf2" >/dev/null 2>&1 && cmp -s "$hf/model.safetensors" "$tmp/hf2/model.safetensors" &&
    cmp -s "$hf/tokenizer.json" "$tmp/hf2/tokenizer.json"; then
    ok "export of the re-imported checkpoint: model.safetensors and tokenizer.json identical byte for byte"
else
    nok "export -> import -> export is byte-identical"
fi

# F16 and BF16 weights are widened exactly; biases absent from a file are 0
$bin ckpt import "$F/f16.safetensors" --out "$tmp/imp16" $model_flags >/dev/null 2>&1
mine=$(c_loss "$tmp/imp16")
[ -n "$mine" ] && e=$(rel_ok "$mine" "$ref_f16" 1e-4) && ok "F16 file imports: loss $mine = reference $ref_f16 (rel err $e)" \
    || nok "F16 import" "reference [$ref_f16] deltamla [$mine]"
$bin ckpt import "$F/bf16.safetensors" --out "$tmp/impbf" $model_flags >/dev/null 2>&1
mine=$(c_loss "$tmp/impbf")
[ -n "$mine" ] && e=$(rel_ok "$mine" "$ref_bf16" 1e-4) && ok "BF16 file imports: loss $mine = reference $ref_bf16 (rel err $e)" \
    || nok "BF16 import" "reference [$ref_bf16] deltamla [$mine]"
$bin ckpt import "$F/nobias.safetensors" --out "$tmp/impnb" $model_flags >/dev/null 2>&1
mine=$(c_loss "$tmp/impnb")
[ -n "$mine" ] && e=$(rel_ok "$mine" "$ref_nobias" 1e-4) && ok "a file without router biases imports with biases 0 (rel err $e)" \
    || nok "import without router biases" "reference [$ref_nobias] deltamla [$mine]"

# lm_head differing from the embedding: a warning, and the embedding is used
err=$($bin ckpt import "$F/lmhead.safetensors" --out "$tmp/implm" $model_flags 2>&1 >/dev/null)
rc=$?
mine=$(c_loss "$tmp/implm")
[ $rc -eq 0 ] && grep -q 'warning: lm_head.weight differs from transformer.wte.weight' <<<"$err" && one_line "$err" &&
    e=$(rel_ok "$mine" "$ref_a" 1e-4) && ok "lm_head.weight unlike wte: imported with one warning: $err" \
    || nok "lm_head differing" "rc=$rc [$err] loss [$mine]"

# refusals: one line on stderr naming the tensor, non-zero exit, nothing written
expect_error() { # description, expected text (grep -E), args...
    local what=$1 want=$2
    shift 2
    local err rc
    err=$($bin "$@" 2>&1 >/dev/null)
    rc=$?
    if [ $rc -ne 0 ] && one_line "$err" && grep -qE -e "$want" <<<"$err"; then
        ok "refused: $what -> $err"
    else
        nok "refused: $what" "rc=$rc stderr=[$err]"
    fi
}
expect_error "missing tensor" "missing tensor transformer\.h\.2\.attn\.wkv_b\.weight$" \
    ckpt import "$F/missing.safetensors" --out "$tmp/x1" $model_flags
expect_error "mis-shaped tensor" "transformer\.h\.0\.attn\.q_proj\.weight has shape \[60, 64\], this model needs \[64, 64\]" \
    ckpt import "$F/misshaped.safetensors" --out "$tmp/x2" $model_flags
expect_error "unknown tensor" "unexpected tensor transformer\.h\.1\.attn\.r_proj\.weight" \
    ckpt import "$F/extra.safetensors" --out "$tmp/x3" $model_flags
expect_error "flags of another model" "the file holds 3 layers .*this model has 6 \(check --n_layer\)" \
    ckpt import "$F/ref.safetensors" --out "$tmp/x4" $model_flags --n_layer 6
expect_error "integer weights" "transformer\.ln_f\.weight has dtype I32" \
    ckpt import "$F/int.safetensors" --out "$tmp/x5" $model_flags
expect_error "truncated file" "truncated" ckpt import "$F/truncated.safetensors" --out "$tmp/x6" $model_flags
expect_error "malformed header JSON" "malformed safetensors header: expected '\"' at byte" \
    ckpt import "$F/badjson.safetensors" --out "$tmp/x8" $model_flags
expect_error "overlapping tensors" "tensors transformer\.ln_f\.weight and x overlap" ckpt import "$F/overlap.safetensors" --out "$tmp/x8" $model_flags
expect_error "a name twice" "tensor transformer\.ln_f\.weight appears twice" ckpt import "$F/dupe.safetensors" --out "$tmp/x8" $model_flags
expect_error "unknown dtype" "dtype 'F12', which safetensors does not define" ckpt import "$F/dtype.safetensors" --out "$tmp/x8" $model_flags
expect_error "bytes not matching the shape" "tensor a has 128 data bytes, but its shape holds 64 F32 elements of 4 bytes" \
    ckpt import "$F/size.safetensors" --out "$tmp/x8" $model_flags
expect_error "not a safetensors file" "not a safetensors file|malformed safetensors header" \
    ckpt import "$data" --out "$tmp/x7" $model_flags
expect_error "import over a run" "already holds checkpoints" ckpt import "$F/ref.safetensors" --out "$tmp/run" $model_flags
expect_error "import without --out" "--out is required" ckpt import "$F/ref.safetensors" $model_flags
expect_error "unknown ckpt command" "unknown ckpt command 'inspect'" ckpt inspect "$tmp/run"
expect_error "directory without checkpoints" "holds no checkpoint" ckpt info "$tmp/files"
refused_dirs=$(ls -d "$tmp"/x? 2>/dev/null | while read -r d; do ls "$d"/ckpt_* 2>/dev/null; done | grep -c '')
[ "$refused_dirs" -eq 0 ] && ok "refused imports wrote no checkpoint" || nok "refused imports wrote no checkpoint"

# --- train resumes from an import ---
if $bin train $train_flags --max_iters 2 --checkpoint_interval 2 --output_dir "$tmp/imp" >"$tmp/resume.log" 2>&1 &&
    grep -q "^resumed from $tmp/imp/ckpt_00000000.h5: step 0" "$tmp/resume.log" &&
    grep -qE '^step +2$' <<<"$($bin ckpt info "$tmp/imp")"; then
    $bin train $train_flags --max_iters 2 --checkpoint_interval 2 --output_dir "$tmp/fresh" >/dev/null 2>&1
    first() { grep -o '"loss":[^,]*' "$1/metrics.jsonl" | head -1; }
    [ "$(first "$tmp/imp")" != "$(first "$tmp/fresh")" ] && ok "deltamla train --output_dir IMPORTED resumes from the import (to step 2, own weights)" \
        || nok "train resumes from the imported weights" "same first loss as a fresh run: $(first "$tmp/imp")"
else
    nok "train resumes from an import" "$(tail -3 "$tmp/resume.log" | tr '\n' ' ')"
fi

# --- a damaged checkpoint fails verify with a message ---
bad=$tmp/bad.h5
cp "$ckpt" "$bad"
# flip bytes inside the embedding's data (found by its exported bytes), else mid-file
python3 - "$bad" "$hf/model.safetensors" <<'PY'
import sys
sys.path.insert(0, "tests/reference")
import safetensors_np
w = safetensors_np.load(sys.argv[2])["transformer.wte.weight"].tobytes()
raw = bytearray(open(sys.argv[1], "rb").read())
at = raw.find(w[4096:4096 + 64])
at = at + 16 if at >= 0 else len(raw) // 2
for i in range(8):
    raw[at + i] ^= 0x5A
open(sys.argv[1], "wb").write(raw)
PY
out=$($bin ckpt verify "$bad" 2>&1)
rc=$?
[ $rc -ne 0 ] && [ -n "$out" ] && one_line "$out" && ok "ckpt verify on a damaged copy fails: $out" || nok "verify damaged" "rc=$rc [$out]"
out=$($bin ckpt info "$bad" 2>"$tmp/info.err")
rc=$?
err=$(cat "$tmp/info.err")
if [ $rc -ne 0 ] && one_line "$err" && grep -qE '^  transformer\.wte\.weight .* BAD: /params/transformer\.wte\.weight fails its checksum' <<<"$out" &&
    grep -qE '^  transformer\.ln_f\.weight .* ok$' <<<"$out" && grep -qE '^1 of 50 tensors damaged' <<<"$out"; then
    ok "ckpt info on the damaged copy marks transformer.wte.weight BAD, the rest ok, exit 1"
else
    nok "ckpt info on a damaged checkpoint" "rc=$rc [$err] $(grep -E 'BAD|damaged' <<<"$out" | tr '\n' ' ')"
fi
err=$($bin ckpt export "$bad" --out "$tmp/badexport" 2>&1 >/dev/null)
rc=$?
[ $rc -ne 0 ] && one_line "$err" && [ ! -e "$tmp/badexport/model.safetensors" ] && ok "export refuses the damaged checkpoint: $err" \
    || nok "export of a damaged checkpoint" "rc=$rc [$err]"
exit 0
