"""An independent, naive per-token reference of the MIT-HAN-Lab LM (specs/mit-lm.md §3), and generators of
state dicts in the authors' exact key format. Written from the spec, loop by loop; slow but obvious."""

from __future__ import annotations

import math

import torch

TINY = dict(
    n_layers=2, n_embed=16, n_embeds=[16, 8, 4], cutoffs=[20, 50], n_vocab=100, n_head=2, n_k=4, n_v=4,
    n_inner=24, n_seq=5, n_cache=12, cache_theta=0.3, cache_lambda=0.2, bits=9,
)
QUANTIZERS = ["quant_ln1", "quant_qkv", "quant_attn", "quant_attnv", "quant_ln2", "fc.1", "fc.4"]


def authors_keys(c: dict, quantized: bool = True, cache_params: bool = False) -> list[tuple[str, tuple]]:
    """Keys and shapes in the authors' state_dict() order (spec §2.1)."""
    edges = [0, *c["cutoffs"], c["n_vocab"]]
    sizes = [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]
    d, dims = c["n_embed"], c["n_embeds"]
    width = c["n_head"] * (2 * c["n_k"] + c["n_v"])
    out = [(f"embed.layers.{i}.weight", (s, e)) for i, (s, e) in enumerate(zip(sizes, dims))]
    out += [(f"embed.projections.{i}.weight", (d, e)) for i, e in enumerate(dims[1:])]
    q = lambda name: [(f"{name}.max_abs", (1,)), (f"{name}.inv_scale", ())] if quantized else []  # noqa: E731
    for n in range(c["n_layers"]):
        p = f"layers.{n}."
        out += [(p + "pos_emb", (c["n_k"], c["n_seq"] + 1)), (p + "ln1.weight", (d,)), (p + "ln1.bias", (d,))]
        out += q(p + "quant_ln1") + [(p + "qkv.weight", (width, d)), (p + "qkv.bias", (width,))]
        out += q(p + "quant_qkv") + q(p + "quant_attn") + q(p + "quant_attnv")
        out += [(p + "out.weight", (d, c["n_head"] * c["n_v"])), (p + "ln2.weight", (d,)), (p + "ln2.bias", (d,))]
        out += q(p + "quant_ln2") + [(p + "fc.0.weight", (c["n_inner"], d)), (p + "fc.0.bias", (c["n_inner"],))]
        out += q(p + "fc.1") + [(p + "fc.3.weight", (d, c["n_inner"])), (p + "fc.3.bias", (d,))] + q(p + "fc.4")
    out += q("quant")
    if cache_params:
        out += [("loss.cache_theta_inv_softplus", ()), ("loss.cache_lambda_inv_sigmoid", ())]
    out += [("loss.clusters.weight", (len(c["cutoffs"]), d)), ("loss.clusters.bias", (len(c["cutoffs"]),))]
    for i, (s, e) in enumerate(zip(sizes, dims)):
        out += [(f"loss.layers.{i}.weight", (s, e)), (f"loss.layers.{i}.bias", (s,))]
    out += [(f"loss.projections.{i}.weight", (e, d)) for i, e in enumerate(dims[1:])]
    return out


def random_state_dict(c: dict, quantized: bool = True, seed: int = 0, untie: bool = True) -> dict:
    """Random weights in the authors' format; quantizer ranges generous enough that clamping is rare.
    With ``untie`` the embed/loss copies of each tied table differ (as after the authors' QAT)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in authors_keys(c, quantized):
        if key.endswith(".max_abs"):
            sd[key] = torch.tensor([2.0 + 4.0 * torch.rand((), generator=g).item()])
        elif key.endswith(".inv_scale"):
            sd[key] = sd[key.replace("inv_scale", "max_abs")][0] / (2 ** (c["bits"] - 1) - 1)
        elif ".ln" in key and key.endswith("weight"):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.5 * torch.randn(shape, generator=g)
    for key in list(sd):
        if key.startswith("embed.layers."):
            other = key.replace("embed.", "loss.")
            sd[other] = sd[key] + (0.01 * torch.randn(sd[key].shape, generator=g) if untie else 0)
    return sd


def reference_nll(sd: dict, c: dict, tokens: torch.Tensor, quantized: bool = True, use_cache: bool = True):
    """Per-prediction NLL of tokens[1:] given the stream, in float64, one token at a time."""
    w = {k: v.double().reshape(()) if k.endswith(("max_abs", "inv_scale")) else v.double() for k, v in sd.items()}
    edges = [0, *c["cutoffs"], c["n_vocab"]]
    D, H, dk, dv, S = c["n_embed"], c["n_head"], c["n_k"], c["n_v"], c["n_seq"]

    def Q(name, x):
        if not quantized:
            return x
        m, s = w[name + ".max_abs"], w[name + ".inv_scale"]
        return torch.round(torch.clamp(x, -m, m) / s) * s

    def ln(name, x):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def bin_of(t):
        return next(i for i in range(len(edges) - 1) if edges[i] <= t < edges[i + 1])

    inputs, targets = tokens[:-1].tolist(), tokens[1:].tolist()
    n = len(inputs)
    xs = []
    for t in inputs:  # the loss copy of a tied table is the one that loads last
        i = bin_of(t)
        e = w[f"loss.layers.{i}.weight"][t - edges[i]]
        if i > 0:
            e = w[f"embed.projections.{i - 1}.weight"] @ e
        xs.append(e * math.sqrt(D))
    for layer in range(c["n_layers"]):
        p = f"layers.{layer}."
        zs = [Q(p + "quant_qkv", w[p + "qkv.weight"] @ Q(p + "quant_ln1", ln(p + "ln1", x)) + w[p + "qkv.bias"])
              for x in xs]
        blk = 2 * dk + dv
        new = []
        for pos in range(n):
            heads = []
            for h in range(H):
                q = zs[pos][h * blk : h * blk + dk]
                scores = []
                vals = []
                for t in range(S + 1):
                    j = pos - S + t
                    k = zs[j][h * blk + dk : h * blk + 2 * dk] if j >= 0 else torch.zeros(dk, dtype=torch.float64)
                    v = zs[j][h * blk + 2 * dk : (h + 1) * blk] if j >= 0 else torch.zeros(dv, dtype=torch.float64)
                    s = (q @ k + q @ w[p + "pos_emb"][:, t]) / math.sqrt(dk)
                    if not quantized and j < 0:
                        s = torch.tensor(float("-inf"), dtype=torch.float64)
                    scores.append(s)
                    vals.append(v)
                alpha = Q(p + "quant_attn", torch.softmax(torch.stack(scores), 0))
                heads.append(sum(a * v for a, v in zip(alpha, vals)))
            u = Q(p + "quant_attnv", torch.cat(heads))
            y = xs[pos] + w[p + "out.weight"] @ u
            a = Q(p + "quant_ln2", ln(p + "ln2", y))
            hid = Q(p + "fc.1", torch.relu(w[p + "fc.0.weight"] @ a + w[p + "fc.0.bias"]))
            new.append(y + Q(p + "fc.4", w[p + "fc.3.weight"] @ hid + w[p + "fc.3.bias"]))
        xs = new
    hs = [Q("quant", x) for x in xs]
    theta, lam = c["cache_theta"], c["cache_lambda"]
    n_cl = len(c["cutoffs"])
    out = []
    for pos, (h, y) in enumerate(zip(hs, targets)):
        head = torch.softmax(torch.cat([w["loss.layers.0.weight"] @ h + w["loss.layers.0.bias"],
                                        w["loss.clusters.weight"] @ h + w["loss.clusters.bias"]]), 0)
        probs = [head[: edges[1]]]
        for i in range(1, len(edges) - 1):
            gate = head[edges[1] + (n_cl - i)]  # cluster row n_cl - i gates bin i (reverse order)
            proj = w[f"loss.projections.{i - 1}.weight"] @ h
            probs.append(gate * torch.softmax(w[f"loss.layers.{i}.weight"] @ proj + w[f"loss.layers.{i}.bias"], 0))
        full = torch.cat(probs)
        assert abs(full.sum().item() - 1) < 1e-9
        p_model = full[y]
        if use_cache:
            window = range(max(0, pos - c["n_cache"]), pos)
            if window:
                e = torch.stack([torch.exp(theta * (h @ hs[j])) for j in window])
                hit = torch.tensor([targets[j] == y for j in window], dtype=torch.float64)
                p_cache = (e * hit).sum() / e.sum()
            else:
                p_cache = torch.tensor(0.0, dtype=torch.float64)
            p = lam * p_cache + (1 - lam) * p_model
        else:
            p = p_model
        out.append(-torch.log(p))
    return torch.stack(out)
