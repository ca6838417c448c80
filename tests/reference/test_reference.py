#!/usr/bin/env python3
"""Whole-step test of deltamla against the independent float64 PyTorch reference.

For each scenario it runs the C dump tool
    <tool> --dump_dir DIR --steps 3 <training flags>
and checks every step of the dump (format: README.md beside this file) against
model_ref.py (forward, loss, z-loss, every gradient) and optim_ref.py (clipping, lr
schedule, AdamW / Muon step, router bias update), printing one TAP-like line per check:
    ok - <scenario>: <what> (rel err X)
    not ok - <scenario>: <what> (rel err X)
and finally "N passed, N failed"; the exit status is non-zero when anything failed.

Usage:
    python3 tests/reference/test_reference.py [TOOL]          # default: $DELTAMLA_REFDUMP,
                                                              # else <repo>/build/tests/refdump
    python3 tests/reference/test_reference.py --only a-muon   # one scenario
    python3 tests/reference/test_reference.py --dump DIR [--name X]   # check an existing dump
    python3 tests/reference/test_reference.py --keep          # keep the dump directories

The check functions (load_dump, check_dump, Reporter, rel_err) are imported by
selfcheck.py, which proves they pass on a correct dump and fail on broken ones.
"""

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import safetensors_np  # noqa: E402
from model_ref import ModelRef, param_shapes, router_bias_shapes, moe_layers, \
    router_bias_name, kv_rank, layer_is_gdn  # noqa: E402
from optim_ref import RefOptimizer, lr_at, bias_update, bias_update_f64_rounded  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TOOL = os.path.join(REPO, "build", "tests", "refdump")
STEPS = 3

# Tolerances (README.md explains them).
TOL_LOSS = 1e-5          # CE loss and z-loss, relative
TOL_GRAD = 1e-4          # every gradient tensor, ||a-b|| / ||b||
TOL_GNORM = 1e-5         # global gradient norm, relative
TOL_LR = 1e-6            # schedule value, relative
TOL_PARAM = 1e-5         # parameters after the optimiser step, per tensor
TOL_PARAM_MUON = 2e-5    # same for Muon-managed matrices: fp32 Newton-Schulz on the
                         # rank-1-dominated gradients of a fresh init is measured 4e-6..8e-6
                         # from float64 (and from another fp32 NS) in this metric
TOL_UPDATE = 1e-4        # the update (after - before), per tensor, beyond fp32 storage rounding
FP32_STORE = 4 * 2.0 ** -24   # rounding allowance of a float32-stored parameter (x ||p||)
TOL_MUON_TORCH = 5e-2    # torch.optim.Muon (bf16 Newton-Schulz) update, per tensor
TOL_MUON_TORCH_ALL = 3e-2  # same, all Muon-managed tensors together
NEAR_TIE = 1e-5          # routing margins below this are reported with failures

BUFFER_SUFFIXES = (".router.expert_bias", ".router.load_history", ".router.update_count")

_COMMON_A = ("--size tiny --n_layer 6 --n_embd 48 --n_head 5 --block_size 80 --batch_size 2 "
             "--deltanet_latent_dim 16 --deltanet_share_qk --mla_q_lora_rank 24 "
             "--n_shared_experts 2 --learning_rate 1e-3 --warmup_iters 2 --max_iters 3").split()
_COMMON_B = ("--size tiny --n_layer 3 --n_embd 48 --n_head 4 --block_size 70 --batch_size 2 "
             "--no_use_latent_moe --n_experts 6 --n_activated 2 --n_shared_experts 1 "
             "--learning_rate 1e-3 --warmup_iters 2 --max_iters 3").split()
_COMMON_C = ("--size tiny --n_layer 3 --n_embd 32 --n_head 4 --block_size 40 --batch_size 2 "
             "--no_use_moe --learning_rate 1e-3 --warmup_iters 2 --max_iters 3").split()

SCENARIOS = [
    ("a-muon", _COMMON_A + ["--optimizer_type", "muon"]),
    ("a-adamw", _COMMON_A + ["--optimizer_type", "adamw"]),
    ("b-muon", _COMMON_B + ["--optimizer_type", "muon"]),
    ("b-adamw", _COMMON_B + ["--optimizer_type", "adamw"]),
    ("c-muon", _COMMON_C + ["--optimizer_type", "muon"]),
    ("c-adamw", _COMMON_C + ["--optimizer_type", "adamw"]),
]


def set_threads():
    """One thread by default: the tensors are tiny, and on a shared 2-core machine torch's
    OpenMP workers spinning against other processes made a step 30x slower with 2."""
    torch.set_num_threads(int(os.environ.get("DELTAMLA_REF_THREADS", "1")))


# --------------------------------------------------------------------------- reporting

class Reporter:
    """Collects and prints ok / not ok lines."""

    def __init__(self, echo=True):
        self.echo = echo
        self.lines = []
        self.passed = 0
        self.failed = 0

    def check(self, ok, scenario, what, err=None, extra=""):
        if err is None:
            tail = ""
        else:
            tail = f" (rel err {err:.3g})"
        line = f"{'ok' if ok else 'not ok'} - {scenario}: {what}{tail}{extra}"
        self.lines.append((bool(ok), line))
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        if self.echo:
            print(line, flush=True)
        return ok

    def note(self, text):
        if self.echo:
            print(f"# {text}", flush=True)

    def summary(self):
        line = f"{self.passed} passed, {self.failed} failed"
        if self.echo:
            print(line, flush=True)
        return line


def rel_err(a, b):
    """||a - b|| / max(||b||, 1e-30) in float64 (0 when both are exactly equal)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    diff = float(np.linalg.norm((a - b).ravel()))
    if diff == 0.0:
        return 0.0
    return diff / max(float(np.linalg.norm(b.ravel())), 1e-30)


def fmt_err(x):
    return "nan" if x != x else f"{x:.3g}"


# --------------------------------------------------------------------------- dump loading

def _scalar(t, key):
    return float(np.asarray(t[key], np.float64).reshape(-1)[0])


def load_dump(path):
    """Read DIR/config.json, DIR/init.safetensors and DIR/step{s}.safetensors (s = 0, 1,
    ... while they exist). Returns dict(cfg, params, biases, steps, names)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    init = safetensors_np.load(os.path.join(path, "init.safetensors"))
    params = {n: a for n, a in init.items()
              if not n.endswith(BUFFER_SUFFIXES) and n != "lm_head.weight"}
    biases = {n: a for n, a in init.items() if n.endswith(".router.expert_bias")}
    steps = []
    s = 0
    while os.path.exists(os.path.join(path, f"step{s}.safetensors")):
        steps.append(safetensors_np.load(os.path.join(path, f"step{s}.safetensors")))
        s += 1
    return {"cfg": cfg, "params": params, "biases": biases, "steps": steps, "dir": path}


# --------------------------------------------------------------------------- checks

def check_structure(dump, scen, rep):
    """Names and shapes in init.safetensors vs MODEL.md/SEED_NAMES.md for this config."""
    cfg = dump["cfg"]
    want = dict(param_shapes(cfg))
    want_b = router_bias_shapes(cfg)
    have = {n: tuple(a.shape) for n, a in dump["params"].items()}
    have_b = {n: tuple(a.shape) for n, a in dump["biases"].items()}
    problems = []
    if int(cfg.get("gradient_accumulation_steps", 1)) != 1:
        problems.append("gradient_accumulation_steps must be 1 in a dump")
    if cfg.get("doc_mask") not in (None, 0, False):
        problems.append("doc_mask is on: the reference does not implement document masking")
    for n in sorted(set(want) - set(have)):
        problems.append(f"missing {n} {want[n]}")
    for n in sorted(set(have) - set(want)):
        problems.append(f"unexpected {n} {have[n]}")
    for n in sorted(set(want) & set(have)):
        if tuple(want[n]) != have[n]:
            problems.append(f"{n} shape {have[n]} != {tuple(want[n])}")
    for n in sorted(set(want_b) ^ set(have_b)):
        problems.append(f"router bias {n} {'missing' if n in want_b else 'unexpected'}")
    for n in sorted(set(want_b) & set(have_b)):
        if tuple(want_b[n]) != have_b[n]:
            problems.append(f"{n} shape {have_b[n]} != {tuple(want_b[n])}")
    rk = [f"{i}:{kv_rank(cfg, i)}" for i in range(int(cfg["n_layer"])) if not layer_is_gdn(cfg, i)]
    extra = f" [{len(want)} tensors, {sum(int(np.prod(s)) for s in want.values())} params, kv ranks {' '.join(rk)}]"
    if problems:
        extra += ": " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
    ok = rep.check(not problems, scen, "parameter names and shapes match the spec", extra=extra)
    if not dump["steps"]:
        rep.check(False, scen, "dump has step files", extra=": no step0.safetensors")
        return False
    names = list(want)
    for s, st in enumerate(dump["steps"]):
        keys = ["inputs", "targets", "loss", "zloss", "lr", "grad_norm"]
        keys += [f"grad.{n}" for n in names] + [f"param.{n}" for n in names]
        keys += [f"bias_after.{n}" for n in want_b]
        missing = [k for k in keys if k not in st]
        if missing:
            rep.check(False, scen, f"step {s}: dump has every key",
                      extra=": missing " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
            ok = False
        for n in names:
            for pre in ("grad.", "param."):
                if pre + n in st and tuple(st[pre + n].shape) != tuple(want[n]):
                    rep.check(False, scen, f"step {s}: {pre}{n} shape {st[pre + n].shape}")
                    ok = False
    return ok


def worst_tensor(a_map, b_map, names):
    worst, wname, errs = -1.0, None, {}
    for n in names:
        e = rel_err(a_map[n], b_map[n])
        errs[n] = e
        if not (e <= worst):  # nan wins
            worst, wname = e, n
    return worst, wname, errs


def reference_step(model_cls, cfg, params, biases, inputs, targets, st, dgrads, names):
    """Forward + backward of the reference at (params, biases) on one step's batch, compared
    with the dump. When that fails and the routing had near-ties (top-k margin < NEAR_TIE,
    where float32 may legitimately choose the other expert), retry with up to the 4
    closest ties flipped, alone and in combinations, and keep a variant that matches.
    Returns (model, (ce, zloss, loads, grads), (err_ce, err_z, worst_grad, worst_name), note)."""

    def run(flips):
        m = model_cls(cfg, params, biases, flips=flips)
        res = m.loss_and_grads(inputs, targets)
        ce, zl, _, grads = res
        worst, wname, _ = worst_tensor(grads, dgrads, names)
        errs = (rel_err(ce, _scalar(st, "loss")), rel_err(zl, _scalar(st, "zloss")), worst, wname)
        good = errs[0] <= TOL_LOSS and errs[1] <= TOL_LOSS and worst <= TOL_GRAD
        return m, res, errs, good

    m, res, errs, good = run(())
    if good or not m.near_ties:
        return m, res, errs, ""
    ties = sorted(m.near_ties)[:4]
    for r in range(1, len(ties) + 1):
        for combo in itertools.combinations(ties, r):
            flips = {(li, tok) for _, li, tok in combo}
            m2, res2, errs2, good2 = run(flips)
            if good2:
                desc = ", ".join(f"layer {li} token {tok} margin {mg:.2g}" for mg, li, tok in combo)
                return m2, res2, errs2, f" [matched after flipping routing near-tie(s) {desc}]"
    return m, res, errs, f" [{len(m.near_ties)} routing near-tie(s), none explains the difference]"


def check_dump(dump, scen, rep, model_cls=ModelRef, torch_muon=True):
    """All checks of one dump (see module docstring). Returns True when all passed."""
    failed0 = rep.failed
    cfg = dump["cfg"]
    if not check_structure(dump, scen, rep):
        return False
    shapes = param_shapes(cfg)
    names = list(shapes)
    mlayers = moe_layers(cfg)
    muon_mode = str(cfg.get("optimizer_type", "muon")) == "muon"
    opt = RefOptimizer(cfg, shapes, muon_impl="f64")
    opt_t = RefOptimizer(cfg, shapes, muon_impl="torch") if (muon_mode and torch_muon) else None
    params = dump["params"]
    biases = dump["biases"]
    for s, st in enumerate(dump["steps"]):
        t0 = time.time()
        inputs = np.asarray(st["inputs"], np.int64)
        targets = np.asarray(st["targets"], np.int64)
        B, T = inputs.shape
        tokens = B * T
        # (1) forward / backward at the parameters before step s
        dgrads = {n: st["grad." + n] for n in names}
        model, (ce, zl, loads, grads), errs, note = reference_step(
            model_cls, cfg, params, biases, inputs, targets, st, dgrads, names)
        e_ce, e_z, worst, wname = errs
        tie_fail = note  # shown on failing lines: flips tried, or the closest routing margin
        if mlayers and not note and model.min_margin < NEAR_TIE:
            tie_fail = f" [closest routing margin {model.min_margin:.2g}]"

        def tie(ok):
            return note if ok else tie_fail

        ok = e_ce <= TOL_LOSS
        rep.check(ok, scen, f"step {s}: ce loss ref {ce:.9g} dump {_scalar(st, 'loss'):.9g}", e_ce,
                  extra=tie(ok))
        ok = e_z <= TOL_LOSS
        rep.check(ok, scen, f"step {s}: z-loss ref {zl:.9g} dump {_scalar(st, 'zloss'):.9g}", e_z,
                  extra=tie(ok))
        ok = worst <= TOL_GRAD
        rep.check(ok, scen, f"step {s}: all {len(names)} gradients (worst {wname})", worst,
                  extra=tie(ok))
        gn_ref = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
        egn = rel_err(gn_ref, _scalar(st, "grad_norm"))
        rep.check(egn <= TOL_GNORM, scen, f"step {s}: grad_norm ref {gn_ref:.9g} dump "
                  f"{_scalar(st, 'grad_norm'):.9g}", egn)
        # (2) optimiser on the dumped gradients, from the dumped parameters
        lr_ref = lr_at(cfg, s)
        elr = rel_err(lr_ref, _scalar(st, "lr"))
        rep.check(elr <= TOL_LR, scen, f"step {s}: lr ref {lr_ref:.9g} dump {_scalar(st, 'lr'):.9g}", elr)
        after = {n: st["param." + n] for n in names}
        new, info = opt.step(params, dgrads, s)
        _, _, perrs = worst_tensor(new, after, names)
        tols = {n: TOL_PARAM_MUON if opt.groups[n][0] == "muon" else TOL_PARAM for n in names}
        wname = max(names, key=lambda n: perrs[n] / tols[n] if perrs[n] == perrs[n] else math.inf)
        worst = perrs[wname]
        rep.check(worst <= tols[wname], scen, f"step {s}: {cfg.get('optimizer_type')} step, params after "
                  f"(worst {wname} vs tol {tols[wname]:.0e}; clip coef {info['clip_coef']:.6g})", worst)
        uworst, uname = -1.0, None
        for n in names:
            before = np.asarray(params[n], np.float64)
            da = new[n] - before
            db = np.asarray(after[n], np.float64) - before
            diff = float(np.linalg.norm((da - db).ravel()))
            allow = FP32_STORE * float(np.linalg.norm(np.asarray(after[n], np.float64).ravel()))
            e = 0.0 if diff <= allow else rel_err(da, db)
            if not (e <= uworst):
                uworst, uname = e, n
        rep.check(uworst <= TOL_UPDATE, scen, f"step {s}: update (after - before) beyond fp32 "
                  f"storage rounding (worst {uname})", uworst)
        # (3) router bias update from the reference's loads
        if mlayers:
            bad, alt_ok, details = 0, True, []
            for i in mlayers:
                bn = router_bias_name(i)
                got = np.asarray(st["bias_after." + bn], np.float32)
                want = bias_update(biases[bn], loads[i], tokens, cfg["moe_k"],
                                   cfg.get("router_bias_update_rate", 0.001))
                nb = int(np.sum(got != want))
                if nb:
                    want2 = bias_update_f64_rounded(biases[bn], loads[i], tokens, cfg["moe_k"],
                                                    cfg.get("router_bias_update_rate", 0.001))
                    if np.array_equal(got, want2):
                        details.append(f"layer {i}: equal to the float64-rounded update")
                        nb = 0
                    else:
                        alt_ok = False
                        details.append(f"layer {i}: {nb} of {got.size} differ")
                bad += nb
            ok = bad == 0 and alt_ok
            rep.check(ok, scen, f"step {s}: router bias update, exact ({len(mlayers)} layers)",
                      extra=(": " + "; ".join(details) if details else "") + tie(ok))
        # (4) torch.optim.Muon itself (bf16 Newton-Schulz): the update of Muon tensors.
        # bf16 NS cannot resolve a gradient whose singular values span more than ~1e-2
        # (exact NS lifts them all towards 1; bf16 rounding of the largest swamps the
        # rest), so tensors on which torch's own update is more than TOL_MUON_TORCH/2 from
        # the exact (float64) update are counted but not compared.
        if opt_t is not None:
            new_t, _ = opt_t.step(params, dgrads, s)
            num = den = 0.0
            tw, tn, used, skipped, skip_worst = -1.0, None, 0, 0, 0.0
            for n in opt_t.muon_names:
                before = np.asarray(params[n], np.float64)
                da = new_t[n] - before
                db = np.asarray(after[n], np.float64) - before
                self_err = rel_err(da, new[n] - before)
                if self_err > TOL_MUON_TORCH / 2:
                    skipped += 1
                    skip_worst = max(skip_worst, self_err)
                    continue
                used += 1
                e = rel_err(da, db)
                num += float(np.sum((da - db) ** 2))
                den += float(np.sum(db ** 2))
                if not (e <= tw):
                    tw, tn = e, n
            tot = 0.0 if num == 0.0 else math.sqrt(num) / max(math.sqrt(den), 1e-30)
            rep.check(used > 0 and tw <= TOL_MUON_TORCH and tot <= TOL_MUON_TORCH_ALL, scen,
                      f"step {s}: torch.optim.Muon update within bf16 accuracy on {used} tensors "
                      f"(worst {tn} {fmt_err(tw)} <= {TOL_MUON_TORCH}, together {fmt_err(tot)} <= "
                      f"{TOL_MUON_TORCH_ALL}; {skipped} ill-conditioned tensors where torch itself is "
                      f"up to {skip_worst:.2g} from exact not compared)")
        rep.note(f"{scen}: step {s} checked in {time.time() - t0:.1f}s")
        # parameters and biases before the next step: the dump's own
        params = after
        if mlayers:
            biases = {bn: st["bias_after." + bn] for bn in router_bias_shapes(cfg)}
    return rep.failed == failed0


# --------------------------------------------------------------------------- tool driver

def run_tool(tool, flags, dump_dir, steps, scen, rep):
    cmd = [tool, "--dump_dir", dump_dir, "--steps", str(steps)] + list(flags)
    rep.note(f"{scen}: {' '.join(cmd)}")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        rep.check(False, scen, f"dump tool runs", extra=f": {e}")
        return False
    if p.returncode != 0:
        sys.stdout.write(p.stderr[-4000:])
        rep.check(False, scen, "dump tool runs", extra=f": exit status {p.returncode}")
        return False
    rep.check(True, scen, "dump tool runs")
    return True


def main(argv):
    args = list(argv)
    only, dump_path, name, keep, tool = None, None, "dump", False, None
    while args:
        a = args.pop(0)
        if a == "--only":
            only = args.pop(0).split(",")
        elif a == "--dump":
            dump_path = args.pop(0)
        elif a == "--name":
            name = args.pop(0)
        elif a == "--keep":
            keep = True
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            tool = a
    set_threads()
    rep = Reporter()
    t0 = time.time()
    if dump_path is not None:
        check_dump(load_dump(dump_path), name, rep)
    else:
        tool = tool or os.environ.get("DELTAMLA_REFDUMP") or DEFAULT_TOOL
        if not os.path.isabs(tool) and not os.path.exists(tool):
            tool = os.path.join(REPO, tool)
        if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
            rep.check(False, "setup", f"dump tool {tool} exists and is executable")
            rep.summary()
            return 1
        for scen, flags in SCENARIOS:
            if only and scen not in only:
                continue
            d = tempfile.mkdtemp(prefix=f"deltamla-ref-{scen}-")
            try:
                if run_tool(tool, flags, d, STEPS, scen, rep):
                    try:
                        dump = load_dump(d)
                    except (OSError, ValueError, KeyError) as e:
                        rep.check(False, scen, "dump is readable", extra=f": {e}")
                        continue
                    if len(dump["steps"]) != STEPS:
                        rep.check(False, scen, f"dump has {STEPS} steps", extra=f": found {len(dump['steps'])}")
                    check_dump(dump, scen, rep)
            finally:
                if keep:
                    rep.note(f"{scen}: dump kept in {d}")
                else:
                    shutil.rmtree(d, ignore_errors=True)
    rep.note(f"total {time.time() - t0:.1f}s")
    rep.summary()
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
