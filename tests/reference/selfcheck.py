#!/usr/bin/env python3
"""Self-check of the reference, without the C tool.

1. Spec figures: the moe-1b acceptance parameter counts of MODEL.md section 10 from
   model_ref.param_shapes, the kv ranks 197/302/407/512, the schedule formula.
2. Building blocks against independent formulations (conv1d, complex RoPE, SDPA,
   clip_grad_norm_, torch.optim.Muon with a float64 Newton-Schulz patched in).
3. A dump made by the reference itself (random init of section 8, random batches with
   some -100 targets, float32 storage, scenario (a) with Muon): test_reference's checks
   must pass on it, and must FAIL when one gradient is perturbed by 1e-3 relative, when
   a parameter after the step is perturbed, when a router bias is off by one step, and
   when the model's SwiGLU convention is swapped (dense MLP or experts).

Prints ok / not ok lines and "N passed, N failed"; exit status non-zero on failure.
"""

import copy
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import safetensors_np  # noqa: E402
import model_ref  # noqa: E402
from model_ref import ModelRef, param_shapes, init_params, kv_rank, moe_layers, router_bias_name  # noqa: E402
import optim_ref  # noqa: E402
from optim_ref import RefOptimizer, lr_at, bias_update, ns5_f64  # noqa: E402
import test_reference as tr  # noqa: E402

# Scenario (a) with the C program's flags; the "tiny" preset's remaining values (vocab,
# MLA head dims, kv rank, expert sizes) are made up here: the checks read them from
# config.json, so any values exercise the same code.
CFG_A = dict(
    n_layer=6, n_embd=48, n_head=5, vocab_size=256, block_size=80,
    swa_layers_per_cycle=2, mla_layers_per_cycle=1,
    deltanet_latent_dim=16, deltanet_share_qk=1,
    mla_q_lora_rank=24, mla_kv_lora_rank=32, mla_qk_nope_head_dim=16,
    mla_qk_rope_head_dim=8, mla_v_head_dim=16, rope_theta=10000.0,
    use_moe=1, use_latent_moe=1, n_shared_experts=2, expert_dim=32,
    router_z_loss_coef=0.001, router_bias_update_rate=0.001,
    learning_rate=1e-3, min_lr=1e-5, warmup_iters=2, max_iters=3,
    weight_decay=0.1, grad_clip=1.0, optimizer_type="muon",
    batch_size=2, gradient_accumulation_steps=1,
    head_dim=9, gdn_proj_dim=45, moe_E=16, moe_k=4, moe_latent=12, moe_hidden=8, moe_in=12,
)


# Scenarios (b) and (c) likewise (other code paths: standard MoE, dense FFN in MLA
# blocks, GDN without latent or shared QK, MLA without q-LoRA, the AdamW groups).
CFG_B = dict(CFG_A, n_layer=3, n_embd=48, n_head=4, block_size=70, deltanet_latent_dim=0,
             deltanet_share_qk=0, mla_q_lora_rank=0, use_latent_moe=0, n_shared_experts=1,
             head_dim=12, gdn_proj_dim=48, moe_E=6, moe_k=2, moe_latent=0, moe_hidden=32,
             moe_in=48, optimizer_type="adamw")
CFG_C = dict(CFG_B, n_embd=32, block_size=40, use_moe=0, head_dim=8, gdn_proj_dim=32,
             moe_E=0, moe_k=0, moe_hidden=0, moe_in=0, optimizer_type="muon")


def make_dump(cfg, path, steps=3, seed=1234, model_cls=ModelRef, flip_closest_tie=False):
    """Write a dump (format of README.md) computed by the reference itself. Parameters,
    gradients and biases are stored as float32 and each step starts from the stored
    float32 values, as the C program's dumps do. flip_closest_tie: route the token with
    the smallest top-k margin of step 1 to its (k+1)-th expert instead, as a float32
    program might; the checks must follow it. Returns that (margin, layer, token) or None."""
    import json
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    params, biases = init_params(cfg, seed)
    init = dict(params)
    init.update(biases)
    safetensors_np.save(os.path.join(path, "init.safetensors"), init)
    rng = np.random.default_rng(seed + 1)
    shapes = param_shapes(cfg)
    opt = RefOptimizer(cfg, shapes, muon_impl="f64")
    flipped = None
    B, T, V = int(cfg["batch_size"]), int(cfg["block_size"]), int(cfg["vocab_size"])
    for s in range(steps):
        inputs = rng.integers(0, V, size=(B, T)).astype(np.int32)
        targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
        targets[rng.random((B, T)) < 0.15] = -100
        model = model_cls(cfg, params, biases)
        ce, zl, loads, grads = model.loss_and_grads(inputs, targets)
        if flip_closest_tie and s == 1:
            flipped = min(model.near_ties)
            model = model_cls(cfg, params, biases, flips={flipped[1:]})
            ce, zl, loads, grads = model.loss_and_grads(inputs, targets)
        g32 = {n: g.astype(np.float32) for n, g in grads.items()}
        new, info = opt.step(params, g32, s)
        out = {"inputs": inputs, "targets": targets,
               "loss": np.float32([ce]), "zloss": np.float32([zl]),
               "lr": np.float32([info["lr"]]), "grad_norm": np.float32([info["grad_norm"]])}
        params = {n: a.astype(np.float32) for n, a in new.items()}
        nb = {}
        for i in moe_layers(cfg):
            bn = router_bias_name(i)
            nb[bn] = bias_update(biases[bn], loads[i], B * T, cfg["moe_k"], cfg["router_bias_update_rate"])
            out["bias_after." + bn] = nb[bn]
        biases = nb
        for n in shapes:
            out["grad." + n] = g32[n]
            out["param." + n] = params[n]
        safetensors_np.save(os.path.join(path, f"step{s}.safetensors"), out)
    return flipped


class SwappedMLP(ModelRef):
    MLP_SILU_ON_SECOND = False


class SwappedExpert(ModelRef):
    EXPERT_SILU_ON_FIRST = False


def quiet_check(dump, name, model_cls=ModelRef, torch_muon=True):
    r = tr.Reporter(echo=False)
    tr.check_dump(dump, name, r, model_cls=model_cls, torch_muon=torch_muon)
    return r


def main():
    tr.set_threads()
    rep = tr.Reporter()
    S = "selfcheck"
    t0 = time.time()

    # ---- 1. spec figures -------------------------------------------------------------
    moe1b = dict(n_layer=12, n_embd=1024, n_head=12, vocab_size=50304, swa_layers_per_cycle=2,
                 mla_layers_per_cycle=1, deltanet_latent_dim=256, deltanet_share_qk=1,
                 mla_q_lora_rank=256, mla_kv_lora_rank=256, mla_qk_nope_head_dim=128,
                 mla_qk_rope_head_dim=64, mla_v_head_dim=128, use_moe=1, use_latent_moe=1,
                 n_shared_experts=1, expert_dim=1024, moe_E=128, moe_k=12, moe_latent=256,
                 moe_hidden=256, moe_in=256)
    shp = param_shapes(moe1b)
    total = sum(int(np.prod(v)) for v in shp.values())
    routed = sum(int(np.prod(v)) for n, v in shp.items() if ".experts." in n)
    active = total - routed + routed * 12 // 128
    rep.check(total == 296719668 and active == 205493556, S,
              f"moe-1b acceptance counts: total {total} (296719668), active {active} (205493556)")
    rk = [kv_rank(moe1b, i) for i in (2, 5, 8, 11)]
    rep.check(rk == [197, 302, 407, 512], S, f"per-layer kv ranks {rk}")
    c = dict(learning_rate=1.0, min_lr=0.0, warmup_iters=4, max_iters=100)
    vals = [lr_at(c, it) for it in (0, 1, 4, 79, 80, 90, 100, 120)]
    want = [0.0, 0.25, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    rep.check(np.allclose(vals, want, atol=1e-15, rtol=0), S, f"lr schedule {vals}")

    # safetensors round trip
    d = tempfile.mkdtemp(prefix="deltamla-selfcheck-")
    try:
        x = {"a": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
             "b": np.array([[1, -100]], np.int32), "c": np.float32([2.5])}
        safetensors_np.save(os.path.join(d, "x.safetensors"), x, {"k": "v"})
        y = safetensors_np.load(os.path.join(d, "x.safetensors"))
        rep.check(all(np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x), S,
                  "safetensors round trip")
    finally:
        shutil.rmtree(d, ignore_errors=True)

    # ---- 2. building blocks vs independent formulations --------------------------------
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(2, 7, 5, dtype=torch.float64, generator=g)
    w = torch.randn(5, 1, 4, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    ref = F.conv1d(F.pad(xx.transpose(1, 2), (3, 0)), w, b, groups=5).transpose(1, 2)
    rep.check(torch.allclose(model_ref.short_conv(xx, w, b), ref, atol=1e-13), S,
              "short conv == F.conv1d(left pad 3), tap 0 oldest")
    xr = torch.randn(3, 6, 8, dtype=torch.float64, generator=g)
    z = torch.view_as_complex(xr.reshape(3, 6, 4, 2).contiguous())
    ang = torch.arange(6, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    zr = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).reshape(3, 6, 8)
    rep.check(torch.allclose(model_ref.rope(xr, 10000.0), zr, atol=1e-13), S,
              "interleaved RoPE == complex rotation of (x[2j], x[2j+1])")

    # clipping vs torch.nn.utils.clip_grad_norm_
    gr = {f"p{i}": np.random.default_rng(i).normal(size=(4, 3)) for i in range(3)}
    ps = [torch.zeros(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    for p, (n, a) in zip(ps, gr.items()):
        p.grad = torch.tensor(a)
    tn = float(torch.nn.utils.clip_grad_norm_(ps, 1.0))
    norm = optim_ref.global_norm(gr)
    coef = optim_ref.clip_coef({"grad_clip": 1.0}, norm)
    e = max(float((p.grad - torch.tensor(a) * coef).abs().max()) for p, a in zip(ps, gr.values()))
    rep.check(abs(tn - norm) < 1e-12 and e < 1e-15, S, "clipping == torch.nn.utils.clip_grad_norm_")

    # Muon transcription == torch.optim.Muon with its Newton-Schulz done in float64
    import torch.optim._muon as tmuon
    saved = tmuon._zeropower_via_newtonschulz
    tmuon._zeropower_via_newtonschulz = lambda G, coeffs, steps, eps: ns5_f64(G)
    try:
        cfgm = dict(CFG_A)
        shapes = {"w1": (7, 5), "w2": (4, 9), "n": (5,)}
        o1 = RefOptimizer(cfgm, shapes, "f64")
        o2 = RefOptimizer(cfgm, shapes, "torch")
        rng = np.random.default_rng(3)
        p = {n: rng.normal(size=s) * 0.02 for n, s in shapes.items()}
        worst = 0.0
        for it in range(4):
            gg = {n: rng.normal(size=s) for n, s in shapes.items()}
            a1, _ = o1.step(p, gg, it)
            a2, _ = o2.step(p, gg, it)
            worst = max(worst, max(tr.rel_err(a1[n], a2[n]) for n in shapes))
            p = a1
    finally:
        tmuon._zeropower_via_newtonschulz = saved
    rep.check(worst < 1e-12, S, "float64 Muon transcription == torch.optim.Muon (NS patched to float64)", worst)

    # ---- 3. a dump made by the reference itself ---------------------------------------
    d = tempfile.mkdtemp(prefix="deltamla-selfcheck-")
    try:
        t1 = time.time()
        make_dump(CFG_A, d, steps=3)
        rep.note(f"made a reference dump in {time.time() - t1:.1f}s")
        dump = tr.load_dump(d)

        r = tr.Reporter(echo=True)
        print("# --- checks on the reference's own dump (all must pass) ---")
        tr.check_dump(dump, "a-muon(self)", r)
        rep.check(r.failed == 0 and r.passed > 0, S, f"checks pass on a correct dump ({r.passed} passed, "
                  f"{r.failed} failed)")

        for nm, cfg in (("b-adamw(self)", CFG_B), ("c-muon(self)", CFG_C),
                        ("b-muon(self)", dict(CFG_B, optimizer_type="muon")),
                        ("c-adamw(self)", dict(CFG_C, optimizer_type="adamw"))):
            dd = os.path.join(d, nm.split("(")[0])
            make_dump(cfg, dd, steps=3, seed=99)
            q = quiet_check(tr.load_dump(dd), nm)
            bad_lines = [ln for ok, ln in q.lines if not ok]
            rep.check(q.failed == 0 and q.passed > 0, S, f"checks pass on a correct {nm} dump "
                      f"({q.passed} passed, {q.failed} failed)" + (": " + bad_lines[0] if bad_lines else ""))

        def expect_fail(what, dmp, pattern, model_cls=ModelRef):
            q = quiet_check(dmp, "x", model_cls=model_cls, torch_muon=False)
            hits = [ln for ok, ln in q.lines if not ok and pattern in ln]
            first = hits[0] if hits else "(none)"
            rep.check(bool(hits), S, f"checks FAIL when {what}: {first}")

        # perturb one gradient tensor by 1e-3 relative (step 1)
        bad = copy.deepcopy(dump)
        name = "transformer.h.3.attn.v_up.weight"
        gt = bad["steps"][1]["grad." + name].astype(np.float64)
        pert = np.random.default_rng(5).normal(size=gt.shape)
        gt = gt + 1e-3 * np.linalg.norm(gt) / np.linalg.norm(pert) * pert
        bad["steps"][1]["grad." + name] = gt.astype(np.float32)
        expect_fail(f"grad.{name} is perturbed by 1e-3 relative", bad, "gradients")

        bad = copy.deepcopy(dump)
        name = "transformer.h.0.attn.k_conv.conv.bias"
        bad["steps"][2]["param." + name] = bad["steps"][2]["param." + name] * np.float32(1 + 1e-4)
        expect_fail(f"param.{name} after step 2 is scaled by 1+1e-4", bad, "params after")

        bad = copy.deepcopy(dump)
        bn = router_bias_name(2)
        bad["steps"][0]["bias_after." + bn] = bad["steps"][0]["bias_after." + bn].copy()
        bad["steps"][0]["bias_after." + bn][3] += np.float32(0.002)
        expect_fail("one router bias is off by two steps", bad, "router bias")

        expect_fail("the dense MLP computes silu(a) * b", dump, "gradients", model_cls=SwappedMLP)
        expect_fail("the experts compute g * silu(u)", dump, "gradients", model_cls=SwappedExpert)

        # a dump whose step 1 routed its closest near-tie the other way (as float32 may)
        d2 = os.path.join(d, "flip")
        flipped = make_dump(CFG_A, d2, steps=3, flip_closest_tie=True)
        q = quiet_check(tr.load_dump(d2), "x", torch_muon=False)
        hit = [ln for ok, ln in q.lines if "matched after flipping" in ln]
        rep.check(q.failed == 0 and bool(hit), S, f"a routing near-tie decided the other way "
                  f"(margin {flipped[0]:.2g}, layer {flipped[1]}, token {flipped[2]}) is followed: "
                  f"{q.passed} passed, {q.failed} failed; {hit[0] if hit else '(no flip reported)'}")
    finally:
        shutil.rmtree(d, ignore_errors=True)

    rep.note(f"total {time.time() - t0:.1f}s")
    rep.summary()
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
