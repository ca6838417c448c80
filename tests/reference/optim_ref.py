"""Float64 reference of MODEL.md section 9 (optimisers, schedule, clipping) and of the
router bias update of section 5.

RefOptimizer keeps its own optimiser state across steps but takes the parameters afresh
at every step (the test feeds it the dumped parameters before step s and the dumped
gradients of step s, so errors do not accumulate). Two Muon implementations:
  muon_impl="f64":   a float64 transcription of the Muon lines of MODEL.md section 9
  muon_impl="torch": torch.optim.Muon itself (Newton-Schulz in bf16; loose check only)
AdamW is torch.optim.AdamW on float64 tensors in both cases.
"""

import math

import numpy as np
import torch

from model_ref import DT, is_norm_weight

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
MUON_MOMENTUM = 0.95
MUON_LR_FACTOR = 200.0
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
CLIP_EPS = 1e-6


def lr_at(cfg, it):
    """Warmup-stable-decay: lr*it/warmup for it < warmup; lr until 0.8*max_iters; cosine
    from lr to min_lr at max_iters (min_lr after)."""
    lr = float(cfg["learning_rate"])
    min_lr = float(cfg.get("min_lr", 1e-5))
    warmup = int(cfg.get("warmup_iters", 0))
    max_iters = int(cfg["max_iters"])
    if it < warmup:
        return lr * it / warmup
    decay_start = 0.8 * max_iters
    if it < decay_start:
        return lr
    if it >= max_iters:
        return min_lr
    ratio = (it - decay_start) / (max_iters - decay_start)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def assign_groups(cfg, shapes):
    """{name: (kind, weight_decay)} with kind 'muon' or 'adamw' (section 9)."""
    wd = float(cfg.get("weight_decay", 0.1))
    mode = str(cfg.get("optimizer_type", "muon"))
    out = {}
    for name, shape in shapes.items():
        if mode == "muon":
            if len(shape) == 2 and name != "transformer.wte.weight":
                out[name] = ("muon", wd)
            else:
                out[name] = ("adamw", wd)
        elif mode == "adamw":
            no_decay = (name.endswith(".bias") or is_norm_weight(name)
                        or name == "transformer.wte.weight")
            out[name] = ("adamw", 0.0 if no_decay else wd)
        else:
            raise ValueError(f"unknown optimizer_type {mode!r}")
    return out


def global_norm(grads):
    """sqrt(sum ||g||^2) in float64 (what clip_grad_norm_ returns)."""
    return float(math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values())))


def clip_coef(cfg, norm):
    """torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + 1e-6)); 1 when disabled."""
    gc = float(cfg.get("grad_clip", 1.0))
    if gc == 0.0:
        return 1.0
    return min(1.0, gc / (norm + CLIP_EPS))


def ns5_f64(G):
    """NS5 of MODEL.md section 9 in float64."""
    a, b, c = NS_COEFFS
    X = G.clone()
    tr = G.shape[0] > G.shape[1]
    if tr:
        X = X.t()
    X = X / torch.clamp(torch.linalg.norm(X), min=NS_EPS)
    for _ in range(5):
        A = X @ X.t()
        Bm = b * A + c * (A @ A)
        X = a * X + Bm @ X
    if tr:
        X = X.t()
    return X


class RefOptimizer:
    def __init__(self, cfg, shapes, muon_impl="f64"):
        self.cfg = cfg
        self.groups = assign_groups(cfg, shapes)
        self.names = list(shapes)
        self.muon_impl = muon_impl
        self.t = {n: torch.zeros(shapes[n], dtype=DT) for n in self.names}
        adam_groups = {}
        for n in self.names:
            kind, wd = self.groups[n]
            if kind == "adamw":
                adam_groups.setdefault(wd, []).append(self.t[n])
        self.adam = None
        if adam_groups:
            self.adam = torch.optim.AdamW(
                [{"params": ps, "weight_decay": wd} for wd, ps in adam_groups.items()],
                lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False)
        self.muon_names = [n for n in self.names if self.groups[n][0] == "muon"]
        self.muon_buf = {n: torch.zeros(shapes[n], dtype=DT) for n in self.muon_names}
        self.torch_muon = None
        if muon_impl == "torch" and self.muon_names:
            wd = self.groups[self.muon_names[0]][1]
            self.torch_muon = torch.optim.Muon(
                [self.t[n] for n in self.muon_names], lr=0.0, weight_decay=wd,
                momentum=MUON_MOMENTUM, nesterov=True, ns_coefficients=NS_COEFFS,
                eps=NS_EPS, ns_steps=5)

    def step(self, params, grads, it):
        """One step from params (dict of arrays) with raw (unclipped) grads at iteration it.
        Returns (new params {name: float64 numpy}, info dict: lr, grad_norm, clip_coef)."""
        lr = lr_at(self.cfg, it)
        norm = global_norm(grads)
        coef = clip_coef(self.cfg, norm)
        with torch.no_grad():
            for n in self.names:
                self.t[n].copy_(torch.as_tensor(np.asarray(params[n], np.float64)))
                self.t[n].grad = torch.as_tensor(np.asarray(grads[n], np.float64)).clone() * coef
            if self.adam is not None:
                for g in self.adam.param_groups:
                    g["lr"] = lr
                self.adam.step()
            muon_lr = MUON_LR_FACTOR * lr
            if self.torch_muon is not None:
                for g in self.torch_muon.param_groups:
                    g["lr"] = muon_lr
                self.torch_muon.step()
            else:
                mu = MUON_MOMENTUM
                for n in self.muon_names:
                    W, G, M = self.t[n], self.t[n].grad, self.muon_buf[n]
                    wd = self.groups[n][1]
                    M.mul_(mu).add_((1 - mu) * G)              # M <- mu M + (1-mu) G
                    Nv = (1 - mu) * G + mu * M                  # nesterov
                    O = ns5_f64(Nv)
                    rows, cols = W.shape
                    W.mul_(1 - muon_lr * wd)
                    W.sub_(muon_lr * math.sqrt(max(1.0, rows / cols)) * O)
        out = {n: self.t[n].detach().numpy().copy() for n in self.names}
        for n in self.names:
            self.t[n].grad = None
        return out, {"lr": lr, "grad_norm": norm, "clip_coef": coef}


def bias_update(bias, load, tokens, k, rate):
    """Router selection bias update of section 5 in float32 arithmetic:
    b_e <- b_e - rate * sign(load_e - tokens*k/E). The comparison is done in integers
    (load_e * E vs tokens * k) so an exactly expected load gives sign 0."""
    bias = np.asarray(bias, np.float32)
    load = np.asarray(load, np.int64)
    E = bias.shape[0]
    sgn = np.sign(load * E - int(tokens) * int(k)).astype(np.float32)
    return (bias - np.float32(rate) * sgn).astype(np.float32)


def bias_update_f64_rounded(bias, load, tokens, k, rate):
    """Same update computed in float64 then rounded to float32 (an implementation that
    keeps gamma as a double gets this; it can differ from bias_update in the last bit)."""
    bias = np.asarray(bias, np.float32).astype(np.float64)
    load = np.asarray(load, np.int64)
    E = bias.shape[0]
    sgn = np.sign(load * E - int(tokens) * int(k)).astype(np.float64)
    return (bias - float(rate) * sgn).astype(np.float32)
