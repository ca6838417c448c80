"""Independent float64 PyTorch reference of the deltamla model (MODEL.md sections 1-6, 8).

Written from ../../../shared/spec/MODEL.md and SEED_NAMES.md alone. Everything runs in
torch.float64 with autograd; the gated delta rule is the plain token-by-token loop of
MODEL.md section 3 (no chunking), attention is the plain masked softmax. Parameters come
in as a dict {SEED_NAMES name: numpy array} and router selection biases as
{"transformer.h.{i}.ffn.router.expert_bias": numpy [E]}.

Conventions pinned here (and tested by selfcheck.py):
  * dense SwiGLU MLP: gate_up -> [a | b], out = down(a * silu(b))   (silu on SECOND half)
  * SwiGLU expert:    gate_up -> [g | u], out = down(silu(g) * u)   (silu on FIRST half)
  * routed expert stacks are [E, in, out] and used as x @ W
  * short conv weight [P, 1, 4], tap 0 is the oldest: y_t = b + sum_s w[s] x_{t-3+s}
  * RoPE on interleaved pairs (x[2j], x[2j+1]) of q_pe and of the ONE shared k_pe
  * MoE top-k on sigmoid(z) + bias, ties to the lower expert index (stable sort);
    gates use the selected sigmoid(z) only, divided by (their sum + 1e-9)

Document masking (MODEL.md section 7) is outside this reference: the scenarios run without it.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

DT = torch.float64
IGNORE_INDEX = -100
RMS_EPS = 1e-6
LN_EPS = 1e-5
ROUTER_GATE_EPS = 1e-9


# --------------------------------------------------------------------------- config

def cfg_int(cfg, key, default=0):
    v = cfg.get(key, default)
    if isinstance(v, bool):
        return int(v)
    return int(v)


def layer_is_gdn(cfg, i):
    """MODEL.md section 1: layer i is GDN iff i mod (gdn + mla) < gdn."""
    g = cfg_int(cfg, "swa_layers_per_cycle", 2)
    m = cfg_int(cfg, "mla_layers_per_cycle", 1)
    return (i % (g + m)) < g


def kv_rank(cfg, i):
    """MODEL.md section 4: rkv(i) = max(1, floor(rank * (0.5 + 1.5 i / (n_layer - 1)))).

    Computed in exact rational arithmetic: 0.5 + 1.5 i/(n-1) = (n - 1 + 3 i) / (2 (n - 1)).
    """
    rank = cfg_int(cfg, "mla_kv_lora_rank")
    n = cfg_int(cfg, "n_layer")
    if n == 1:
        return max(1, rank)
    return max(1, (rank * (n - 1 + 3 * i)) // (2 * (n - 1)))


def dims(cfg):
    d = cfg_int(cfg, "n_embd")
    H = cfg_int(cfg, "n_head")
    hk = cfg_int(cfg, "head_dim", d // H) or d // H
    P = cfg_int(cfg, "gdn_proj_dim", H * hk) or H * hk
    return dict(
        d=d, H=H, hk=hk, P=P, V=cfg_int(cfg, "vocab_size"),
        r=cfg_int(cfg, "deltanet_latent_dim"), share=bool(cfg_int(cfg, "deltanet_share_qk")),
        rq=cfg_int(cfg, "mla_q_lora_rank"), dn=cfg_int(cfg, "mla_qk_nope_head_dim"),
        dr=cfg_int(cfg, "mla_qk_rope_head_dim"), dv=cfg_int(cfg, "mla_v_head_dim"),
        moe=bool(cfg_int(cfg, "use_moe")), latent=bool(cfg_int(cfg, "use_latent_moe")),
        n_shared=cfg_int(cfg, "n_shared_experts"), ed=cfg_int(cfg, "expert_dim"),
        E=cfg_int(cfg, "moe_E"), k=cfg_int(cfg, "moe_k"), l=cfg_int(cfg, "moe_latent"),
        h=cfg_int(cfg, "moe_hidden"), min_=cfg_int(cfg, "moe_in"),
    )


def param_shapes(cfg):
    """{name: shape} of every trained parameter (SEED_NAMES.md), in model order.
    Router selection biases are buffers and listed by router_bias_shapes()."""
    D = dims(cfg)
    d, H, P, r = D["d"], D["H"], D["P"], D["r"]
    out = {"transformer.wte.weight": (D["V"], d)}
    for i in range(cfg_int(cfg, "n_layer")):
        pre = f"transformer.h.{i}."
        if layer_is_gdn(cfg, i):
            out[pre + "norm1.weight"] = (d,)
            a = pre + "attn."
            if r == 0:
                if D["share"]:
                    out[a + "qk_proj.weight"] = (P, d)
                else:
                    out[a + "q_proj.weight"] = (P, d)
                    out[a + "k_proj.weight"] = (P, d)
                out[a + "v_proj.weight"] = (P, d)
                out[a + "o_proj.weight"] = (d, P)
            else:
                for t in (["qk"] if D["share"] else ["q", "k"]) + ["v"]:
                    out[a + f"{t}_down.weight"] = (r, d)
                    out[a + f"{t}_up.weight"] = (P, r)
                out[a + "o_down.weight"] = (r, P)
                out[a + "o_up.weight"] = (d, r)
            out[a + "g_proj.weight"] = (H, d)
            out[a + "beta_proj.weight"] = (H, d)
            for t in ("q", "k", "v"):
                out[a + f"{t}_conv.conv.weight"] = (P, 1, 4)
                out[a + f"{t}_conv.conv.bias"] = (P,)
            out[pre + "norm2.weight"] = (d,)
            out[pre + "mlp.gate_up_proj.weight"] = (8 * d, d)
            out[pre + "mlp.down_proj.weight"] = (d, 4 * d)
        else:
            dn, dr, dv, rq = D["dn"], D["dr"], D["dv"], D["rq"]
            rkv = kv_rank(cfg, i)
            out[pre + "attn_norm.weight"] = (d,)
            a = pre + "attn."
            if rq == 0:
                out[a + "wq.weight"] = (H * (dn + dr), d)
            else:
                out[a + "wq_a.weight"] = (rq, d)
                out[a + "q_norm.weight"] = (rq,)
                out[a + "q_norm.bias"] = (rq,)
                out[a + "wq_b.weight"] = (H * (dn + dr), rq)
            out[a + "wkv_a.weight"] = (rkv + dr, d)
            out[a + "kv_norm.weight"] = (rkv,)
            out[a + "kv_norm.bias"] = (rkv,)
            out[a + "wkv_b.weight"] = (H * (dn + dv), rkv)
            out[a + "wo.weight"] = (d, H * dv)
            out[pre + "ffn_norm.weight"] = (d,)
            f = pre + "ffn."
            if not D["moe"]:
                out[f + "gate_up_proj.weight"] = (8 * d, d)
                out[f + "down_proj.weight"] = (d, 4 * d)
            else:
                E, h, m_in, ed = D["E"], D["h"], D["min_"], D["ed"]
                out[f + "router.gate.weight"] = (E, d)
                for j in range(D["n_shared"]):
                    out[f + f"shared_experts.{j}.gate_up_proj.weight"] = (2 * ed, d)
                    out[f + f"shared_experts.{j}.down_proj.weight"] = (d, ed)
                out[f + "experts.gate_up_weight"] = (E, m_in, 2 * h)
                out[f + "experts.down_weight"] = (E, h, m_in)
                if D["latent"]:
                    out[f + "down_proj.weight"] = (D["l"], d)
                    out[f + "up_proj.weight"] = (d, D["l"])
    out["transformer.ln_f.weight"] = (d,)
    return out


def moe_layers(cfg):
    if not cfg_int(cfg, "use_moe"):
        return []
    return [i for i in range(cfg_int(cfg, "n_layer")) if not layer_is_gdn(cfg, i)]


def router_bias_name(i):
    return f"transformer.h.{i}.ffn.router.expert_bias"


def router_bias_shapes(cfg):
    return {router_bias_name(i): (cfg_int(cfg, "moe_E"),) for i in moe_layers(cfg)}


def is_norm_weight(name):
    """RMSNorm and LayerNorm weights (wd 0 in AdamW mode)."""
    return name.endswith(".weight") and (
        name == "transformer.ln_f.weight" or name.split(".")[-2] in
        ("norm1", "norm2", "attn_norm", "ffn_norm", "q_norm", "kv_norm"))


def init_params(cfg, seed=0):
    """Random init of MODEL.md section 8 in float32: Linear/embedding/expert weights
    N(0, 0.02), norm weights 1, LayerNorm biases 0, conv weights and biases U(-1/2, 1/2),
    router biases 0. Returns (params, biases)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if is_norm_weight(name):
            a = np.ones(shape)
        elif name.endswith("norm.bias"):
            a = np.zeros(shape)
        elif "_conv.conv." in name:
            a = rng.uniform(-0.5, 0.5, size=shape)
        else:
            a = rng.normal(0.0, 0.02, size=shape)
        params[name] = a.astype(np.float32)
    biases = {n: np.zeros(s, np.float32) for n, s in router_bias_shapes(cfg).items()}
    return params, biases


# --------------------------------------------------------------------------- building blocks

def linear(x, w):
    """Linear a->b with weight [b, a]: y = x W^T."""
    return x @ w.t()


def rms_norm(x, w):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS) * w + b


def silu(x):
    return x * torch.sigmoid(x)


def rope(x, theta):
    """Interleaved RoPE. x [..., T, D]; position p = index along dim -2 (from 0)."""
    T, D = x.shape[-2], x.shape[-1]
    j = torch.arange(D // 2, dtype=DT)
    inv = theta ** (-2.0 * j / D)
    ang = torch.arange(T, dtype=DT)[:, None] * inv[None, :]
    c, s = torch.cos(ang), torch.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * c - x1 * s
    y1 = x1 * c + x0 * s
    return torch.stack([y0, y1], dim=-1).reshape(x.shape)


def short_conv(x, w, b):
    """Causal depthwise conv, kernel 4, bias, no activation. x [B, T, P], w [P, 1, 4],
    b [P]: y_t = b + sum_{s=0..3} w[s] x_{t-3+s}, zero before the sequence start."""
    T = x.shape[1]
    y = b.expand_as(x)
    for s in range(4):
        shift = 3 - s  # x_{t - shift}
        if shift >= T:
            continue
        xs = F.pad(x[:, :T - shift, :], (0, 0, shift, 0)) if shift else x
        y = y + w[:, 0, s] * xs
    return y


# --------------------------------------------------------------------------- model

class ModelRef:
    """The whole model in float64. Construct with (cfg, params, biases); call forward."""

    # SwiGLU conventions (selfcheck flips these in a subclass to prove the test sees it)
    MLP_SILU_ON_SECOND = True     # dense MLP: out = down(a * silu(b))
    EXPERT_SILU_ON_FIRST = True   # experts:   out = down(silu(g) * u)

    NEAR_TIE = 1e-5  # top-k margins below this are recorded in self.near_ties

    def __init__(self, cfg, params, biases=None, flips=()):
        self.cfg = cfg
        self.D = dims(cfg)
        self.theta = float(cfg.get("rope_theta", 10000.0))
        self.zcoef = float(cfg.get("router_z_loss_coef", 0.001))
        self.p = {n: torch.tensor(np.asarray(a, dtype=np.float64), dtype=DT, requires_grad=True)
                  for n, a in params.items()}
        self.bias = {n: torch.tensor(np.asarray(a, dtype=np.float64), dtype=DT)
                     for n, a in (biases or {}).items()}
        # Routing near-ties: float32 and float64 can legitimately pick different experts
        # when the k-th and (k+1)-th scores (a + b) are within rounding of each other.
        # forward() records every (margin, layer, token) with margin < NEAR_TIE in
        # self.near_ties; a (layer, token) pair in `flips` takes the (k+1)-th expert
        # instead of the k-th, which lets the test follow the other program's choice.
        self.flips = set(flips)
        self.min_margin = math.inf
        self.near_ties = []

    # --- pieces --------------------------------------------------------------------------

    def mlp(self, x, pre):
        ab = linear(x, self.p[pre + "gate_up_proj.weight"])
        a, b = ab.chunk(2, dim=-1)
        hid = a * silu(b) if self.MLP_SILU_ON_SECOND else silu(a) * b
        return linear(hid, self.p[pre + "down_proj.weight"])

    def expert_act(self, gu):
        g, u = gu.chunk(2, dim=-1)
        return silu(g) * u if self.EXPERT_SILU_ON_FIRST else g * silu(u)

    def proj_in(self, u, a, t):
        """GDN input projection t in {q, k, v, qk}: direct or latent down/up."""
        if self.D["r"] == 0:
            return linear(u, self.p[a + f"{t}_proj.weight"])
        return linear(linear(u, self.p[a + f"{t}_down.weight"]), self.p[a + f"{t}_up.weight"])

    def gdn(self, u, i):
        D = self.D
        B, T, _ = u.shape
        H, hk = D["H"], D["hk"]
        a = f"transformer.h.{i}.attn."
        if D["share"]:
            q_in = k_in = self.proj_in(u, a, "qk")
        else:
            q_in = self.proj_in(u, a, "q")
            k_in = self.proj_in(u, a, "k")
        v_in = self.proj_in(u, a, "v")
        q = short_conv(q_in, self.p[a + "q_conv.conv.weight"], self.p[a + "q_conv.conv.bias"])
        k = short_conv(k_in, self.p[a + "k_conv.conv.weight"], self.p[a + "k_conv.conv.bias"])
        v = short_conv(v_in, self.p[a + "v_conv.conv.weight"], self.p[a + "v_conv.conv.bias"])
        q = q.reshape(B, T, H, hk)
        k = k.reshape(B, T, H, hk)
        v = v.reshape(B, T, H, hk)
        k = k / torch.clamp(torch.sqrt((k * k).sum(-1, keepdim=True)), min=1e-12)
        q = q * hk ** -0.5
        g = F.logsigmoid(linear(u, self.p[a + "g_proj.weight"]))      # [B, T, H]
        beta = torch.sigmoid(linear(u, self.p[a + "beta_proj.weight"]))
        S = torch.zeros(B, H, hk, hk, dtype=DT)                      # S[k-dim, v-dim]
        outs = []
        for t in range(T):
            S = torch.exp(g[:, t])[:, :, None, None] * S
            kt, vt, qt = k[:, t], v[:, t], q[:, t]                     # [B, H, hk]
            Stk = torch.einsum("bhij,bhi->bhj", S, kt)                 # S^T k
            w = beta[:, t][:, :, None] * (vt - Stk)
            S = S + kt[:, :, :, None] * w[:, :, None, :]
            outs.append(torch.einsum("bhij,bhi->bhj", S, qt))         # S^T q
        o = torch.stack(outs, dim=1).reshape(B, T, H * hk)
        if D["r"] == 0:
            return linear(o, self.p[a + "o_proj.weight"])
        return linear(linear(o, self.p[a + "o_down.weight"]), self.p[a + "o_up.weight"])

    def mla(self, u, i):
        D = self.D
        B, T, _ = u.shape
        H, dn, dr, dv = D["H"], D["dn"], D["dr"], D["dv"]
        rkv = kv_rank(self.cfg, i)
        a = f"transformer.h.{i}.attn."
        if D["rq"] == 0:
            q = linear(u, self.p[a + "wq.weight"])
        else:
            qa = layer_norm(linear(u, self.p[a + "wq_a.weight"]),
                            self.p[a + "q_norm.weight"], self.p[a + "q_norm.bias"])
            q = linear(qa, self.p[a + "wq_b.weight"])
        q = q.reshape(B, T, H, dn + dr).transpose(1, 2)             # [B, H, T, dn+dr]
        q_nope, q_pe = q[..., :dn], rope(q[..., dn:], self.theta)
        c = linear(u, self.p[a + "wkv_a.weight"])                     # [B, T, rkv+dr]
        c_kv, k_pe = c[..., :rkv], rope(c[..., rkv:], self.theta)     # k_pe [B, T, dr]
        kv = linear(layer_norm(c_kv, self.p[a + "kv_norm.weight"], self.p[a + "kv_norm.bias"]),
                    self.p[a + "wkv_b.weight"])
        kv = kv.reshape(B, T, H, dn + dv).transpose(1, 2)           # [B, H, T, dn+dv]
        k_nope, v = kv[..., :dn], kv[..., dn:]
        scores = (q_nope @ k_nope.transpose(-1, -2)
                  + q_pe @ k_pe[:, None].transpose(-1, -2)) * (dn + dr) ** -0.5
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, H * dv)
        return linear(o, self.p[a + "wo.weight"])

    def moe(self, u, i):
        """(Latent)MoE on u [B, T, d]. Returns (out, zloss, load[E] int64)."""
        D = self.D
        B, T, d = u.shape
        E, k = D["E"], D["k"]
        f = f"transformer.h.{i}.ffn."
        x = u.reshape(B * T, d)
        N = x.shape[0]
        z = linear(x, self.p[f + "router.gate.weight"])              # [N, E]
        aff = torch.sigmoid(z)
        b = self.bias.get(router_bias_name(i), torch.zeros(E, dtype=DT))
        score = (aff + b).detach()
        order = torch.sort(-score, dim=-1, stable=True).indices       # ties -> lower index
        if k < E:
            ss = torch.gather(score, 1, order)
            margin = ss[:, k - 1] - ss[:, k]
            self.min_margin = min(self.min_margin, float(margin.min()))
            for tok in (margin < self.NEAR_TIE).nonzero(as_tuple=True)[0].tolist():
                self.near_ties.append((float(margin[tok]), i, tok))
            flip = [tok for (li, tok) in self.flips if li == i]
            if flip:
                order = order.clone()
                for tok in flip:
                    order[tok, [k - 1, k]] = order[tok, [k, k - 1]]
        idx = order[:, :k]                                            # [N, k]
        sel = torch.gather(aff, 1, idx)
        gates = sel / (sel.sum(-1, keepdim=True) + ROUTER_GATE_EPS)
        zloss = self.zcoef * torch.logsumexp(z, dim=-1).pow(2).mean()
        load = torch.bincount(idx.reshape(-1), minlength=E).numpy().astype(np.int64)

        out = torch.zeros_like(x)
        for j in range(D["n_shared"]):
            s = f + f"shared_experts.{j}."
            out = out + linear(self.expert_act(linear(x, self.p[s + "gate_up_proj.weight"])),
                               self.p[s + "down_proj.weight"])
        xin = linear(x, self.p[f + "down_proj.weight"]) if D["latent"] else x
        W1 = self.p[f + "experts.gate_up_weight"]                     # [E, in, 2h]
        W2 = self.p[f + "experts.down_weight"]                        # [E, h, in]
        y = torch.zeros(N, W2.shape[2], dtype=DT)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            he = self.expert_act(xin[tok] @ W1[e]) @ W2[e]
            y = y.index_add(0, tok, gates[tok, slot][:, None] * he)
        if D["latent"]:
            y = linear(y, self.p[f + "up_proj.weight"])
        out = out + y
        return out.reshape(B, T, d), zloss, load

    # --- whole model --------------------------------------------------------------------

    def forward(self, inputs, targets):
        """inputs, targets: int arrays [B, T] (targets may hold -100).

        Returns (ce_loss, zloss_sum, loads): two 0-d float64 tensors with autograd and
        {layer index: int64 numpy [E] tokens routed to each expert}."""
        self.min_margin = math.inf
        self.near_ties = []
        inputs = torch.as_tensor(np.asarray(inputs, dtype=np.int64))
        targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        wte = self.p["transformer.wte.weight"]
        x = wte[inputs]
        zsum = torch.zeros((), dtype=DT)
        loads = {}
        for i in range(cfg_int(self.cfg, "n_layer")):
            pre = f"transformer.h.{i}."
            if layer_is_gdn(self.cfg, i):
                x = x + self.gdn(rms_norm(x, self.p[pre + "norm1.weight"]), i)
                x = x + self.mlp(rms_norm(x, self.p[pre + "norm2.weight"]), pre + "mlp.")
            else:
                x = x + self.mla(rms_norm(x, self.p[pre + "attn_norm.weight"]), i)
                u = rms_norm(x, self.p[pre + "ffn_norm.weight"])
                if self.D["moe"]:
                    y, zl, load = self.moe(u, i)
                    zsum = zsum + zl
                    loads[i] = load
                else:
                    y = self.mlp(u, pre + "ffn.")
                x = x + y
        x = rms_norm(x, self.p["transformer.ln_f.weight"])
        logits = x @ wte.t()                                          # tied head
        lse = torch.logsumexp(logits, dim=-1)
        valid = targets != IGNORE_INDEX
        tgt = torch.where(valid, targets, torch.zeros_like(targets))
        picked = torch.gather(logits, -1, tgt[..., None])[..., 0]
        nll = (lse - picked) * valid.to(DT)
        ce = nll.sum() / valid.sum().to(DT)
        return ce, zsum, loads

    def loss_and_grads(self, inputs, targets):
        """Forward + backward of (ce + zloss). Returns (ce, zloss, loads, grads) with
        floats and {name: float64 numpy}."""
        for t in self.p.values():
            t.grad = None
        ce, zl, loads = self.forward(inputs, targets)
        (ce + zl).backward()
        grads = {n: (t.grad.detach().numpy().copy() if t.grad is not None
                     else np.zeros(t.shape)) for n, t in self.p.items()}
        return float(ce.detach()), float(zl.detach()), loads, grads
