"""MAG, MAL, LMM and the paper-order MAC against an oracle: a per-token loop written from the paper's equations
(Titans v1 sections 3-4, eqs. 8-15 and 21-31), which reads the models' weights but none of titans_mlx's code.

The oracle, token by token: the memory's inner loss l_t(W) = theta_t * mean((f(W; k_t) - v_t)^2), its gradient taken at
the weights the token's chunk started from (the chunked mini-batch gradient descent of the paper, our NeuralMemory with
batch_size = chunk size), summed over the chunk; when the chunk completes S = eta * S - sum of gradients (momentum;
S = -sum without it) and W = (1 - alpha) * W + S, with alpha, eta from the mean of the chunk's store-normed tokens and
theta_t per token; a token reads f(W; q_t) with the weights after every chunk that ends at or before it. Attention:
each query against the persistent keys and the keys a naive causal sliding window (i - j <= window) or segment lets it
see, rotary positions (GPT-J pairs), softmax. Feed-forward: SwiGLU.

Options covered: memory network linear (MemoryMLP depth 1) and 2-layer GELU MLP, both without the ResidualNorm wrapper
(mem_model_norm_add_residual=False); momentum on and off; chunk sizes 2 and 3; one and two heads (with the per-head
read gate and head merge); pre-RMSNorm; the default step-size transform (sigmoid * 1). Models: float32, batch 2, no
axial positions, plain residuals. Tolerances: 1e-5 relative for the memory alone, 1e-4 for whole models.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from titans_mlx.io import build_model
from titans_mlx.memory import NeuralMemory

EPS = float(np.finfo(np.float32).eps)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def rms(x, w):
    return x / mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def linear(p, name, x, bias=True):
    y = x @ p[name + ".weight"].T
    return y + p[name + ".bias"] if bias and name + ".bias" in p else y


def memory_net(weights, x):
    # f(W; x): x @ W1 (linear), or gelu(x @ W1) @ W2 (two layers)
    for i, w in enumerate(weights):
        x = (nn.gelu(x) if i else x) @ w
    return x


class Memory:
    """The paper's long-term memory for one sequence, one token at a time."""

    def __init__(self, p, heads, dim_head, chunk, momentum):
        self.p, self.H, self.dh, self.C, self.momentum = p, heads, dim_head, chunk, momentum
        n = sum(1 for k in p if k.startswith("memory_model_parameters."))
        self.W = [[p[f"memory_model_parameters.{i}"][h] for i in range(n)] for h in range(heads)]
        self.S = [[mx.zeros_like(w) for w in ws] for ws in self.W]
        self._new_chunk()

    def _new_chunk(self):
        self.start = [list(ws) for ws in self.W]  # gradients of this chunk are taken here
        self.grads = [[mx.zeros_like(w) for w in ws] for ws in self.W]
        self.normed = []

    def heads(self, t):
        return [t[h * self.dh:(h + 1) * self.dh] for h in range(self.H)]

    def write(self, x):
        p = self.p
        xs = rms(x, p["store_norm.weight"])
        keys, values = self.heads(linear(p, "to_keys", xs)), self.heads(linear(p, "to_values", xs))
        theta = mx.sigmoid(linear(p, "to_adaptive_step", xs))  # eq. 13's theta_t, per head
        for h in range(self.H):
            loss = lambda W: theta[h] * mx.mean((memory_net(W, keys[h]) - values[h]) ** 2)
            self.grads[h] = [a + g for a, g in zip(self.grads[h], mx.grad(loss)(self.start[h]))]
        self.normed.append(xs)
        if len(self.normed) == self.C:  # the chunk is complete: eqs. 13-14
            rep = mx.mean(mx.stack(self.normed), axis=0)
            alpha = mx.sigmoid(linear(p, "to_decay_factor", rep))
            eta = mx.sigmoid(linear(p, "to_momentum", rep)) if self.momentum else None
            for h in range(self.H):
                for i, g in enumerate(self.grads[h]):
                    self.S[h][i] = (eta[h] * self.S[h][i] - g) if self.momentum else -g
                    self.W[h][i] = (1 - alpha[h]) * self.W[h][i] + self.S[h][i]
            self._new_chunk()

    def read(self, x, W=None):
        p, W = self.p, W or self.W
        xr = rms(x, p["retrieve_norm.weight"])
        queries = self.heads(linear(p, "to_queries", xr, bias=False))
        reads = [memory_net(W[h], queries[h]) for h in range(self.H)]  # eq. 15
        if self.H == 1:
            return reads[0]
        gate = mx.sigmoid(linear(p, "retrieve_gate", xr, bias=False))
        return linear(p, "combine_heads", mx.concatenate([r * gate[h] for h, r in enumerate(reads)]), bias=False)

    def snapshot(self):
        return [list(ws) for ws in self.W]


def memory_of(p, prefix, mem_cfg):
    sub = {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    return Memory(sub, **mem_cfg)


def rotate(x, pos):
    # GPT-J rotary: pairs (x[2i], x[2i+1]) turned by pos * 10000^(-2i/dh)
    dh = x.shape[-1]
    freqs = 1.0 / (10000.0 ** (np.arange(0, dh, 2) / dh))
    ang = mx.array((pos * freqs).astype(np.float32))
    x1, x2 = x[0::2], x[1::2]
    return mx.stack([x1 * mx.cos(ang) - x2 * mx.sin(ang), x2 * mx.cos(ang) + x1 * mx.sin(ang)], axis=-1).reshape(-1)


def attention(p, prefix, X, heads, dh, window, sliding, H_mem=None):
    """Causal attention over rows X (n, dim), persistent tokens first; with H_mem (n, dim) also each visible
    position's retrieved token (the paper-order MAC's [p || h || S])."""
    a = {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    pk, pv = a["persistent_memory"][0], a["persistent_memory"][1]
    proj = lambda x: mx.split(rms(x, a["norm.weight"]) @ a["to_qkv.weight"].T, 3)
    n, outs = X.shape[0], []
    qkv = [proj(X[j]) for j in range(n)]
    hkv = [proj(H_mem[j]) for j in range(n)] if H_mem is not None else None
    for i in range(n):
        visible = [j for j in range(i + 1) if (i - j <= window if sliding else j // window == i // window)]
        heads_out = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            q = rotate(qkv[i][0][sl], i)
            ks = [pk[h, t] for t in range(pk.shape[1])]
            vs = [pv[h, t] for t in range(pv.shape[1])]
            for j in visible:
                ks.append(rotate(qkv[j][1][sl], j))
                vs.append(qkv[j][2][sl])
                if hkv is not None:
                    ks.append(rotate(hkv[j][1][sl], j))
                    vs.append(hkv[j][2][sl])
            scores = mx.stack([mx.sum(q * k) for k in ks]) / math.sqrt(dh)
            heads_out.append(mx.softmax(scores) @ mx.stack(vs))
        outs.append(mx.concatenate(heads_out) @ a["to_out.weight"].T)
    return mx.stack(outs)


def feed_forward(p, prefix, X):
    value, gate = mx.split(linear(p, prefix + "proj_in", rms(X, p[prefix + "norm.weight"])), 2, axis=-1)
    return linear(p, prefix + "proj_out", nn.silu(gate) * value)


def run_memory(p, prefix, X, mem_cfg):
    mem, out = memory_of(p, prefix, mem_cfg), []
    for t in range(X.shape[0]):
        mem.write(X[t])
        out.append(mem.read(X[t]))
    return mx.stack(out)


def oracle_model(model, ids, cfg, mem_cfg):
    """The whole model for one sequence of token ids, layer by layer."""
    p = dict(tree_flatten(model.parameters()))
    kind, heads, dh, S = cfg["model_type"], cfg["heads"], cfg["dim_head"], cfg["segment_len"]
    X = p["token_emb.weight"][mx.array(ids)]
    for i in range(cfg["depth"]):
        L = f"layers.{i}."
        if kind == "titans_mag":  # eqs. 26-28
            y = attention(p, L + "attn.", X, heads, dh, S, True)
            m = run_memory(p, L + "mem.", X, mem_cfg)
            X = X + rms(y, p[L + "attn_out_norm.weight"]) * mx.sigmoid(rms(m, p[L + "mem_out_norm.weight"]))
        elif kind == "titans_mal":  # eqs. 29-31
            X = X + run_memory(p, L + "mem.", X, mem_cfg)
            X = X + attention(p, L + "attn.", X, heads, dh, S, True)
        elif kind == "titans_lmm":
            X = X + run_memory(p, L + "mem.", X, mem_cfg)
        else:  # paper-order MAC, eqs. 21-25: token by token, each segment's first read from the memory it found
            mem, rows, H_mem, Y = memory_of(p, L + "mem.", mem_cfg), [], [], []
            sliding = cfg.get("sliding_window_attn", False)
            for t in range(X.shape[0]):
                if t % S == 0:
                    at_segment_start = mem.snapshot()
                H_mem.append(mem.read(X[t], at_segment_start))  # h_t = M*_{t-1}(q_t)
                y = attention(p, L + "attn.", X[:t + 1], heads, dh, S, sliding, mx.stack(H_mem))[t]
                mem.write(y)  # M_t = M_{t-1}(y_t)
                rows.append(y * mx.sigmoid(mem.read(y)))  # o_t = y_t (x) M*_t(y_t)
            X = X + mx.stack(rows)
        X = X + feed_forward(p, L + "ff.", X)
    return rms(X, p["norm.weight"]) @ p["to_logits.weight"].T


MEMORIES = {
    "linear_momentum_c2": (dict(depth=1), True, 2, 1),
    "mlp2_momentum_c3_heads2": (dict(depth=2, expansion_factor=2.0), True, 3, 2),
    "mlp2_no_momentum_c2_heads2": (dict(depth=2, expansion_factor=2.0), False, 2, 2),
    "linear_no_momentum_c3": (dict(depth=1), False, 3, 1),
}


def memory_options(name, dim):
    spec, momentum, chunk, heads = MEMORIES[name]
    dh = dim // heads
    model = dict(spec, **{"class": "MemoryMLP", "dim": dh})
    kwargs = dict(heads=heads, dim_head=dh, momentum=momentum, mem_model_norm_add_residual=False)
    return model, kwargs, chunk, dict(heads=heads, dim_head=dh, chunk=chunk, momentum=momentum)


@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_neural_memory_matches_the_per_token_oracle(name):
    dim = 16
    model, kwargs, chunk, mem_cfg = memory_options(name, dim)
    mx.random.seed(1)
    mem = NeuralMemory(dim, chunk_size=chunk, batch_size=chunk, model=model, **kwargs)
    x = mx.random.normal((2, 11, dim))
    got, _ = mem(x)
    p = dict(tree_flatten(mem.parameters()))
    for b in range(2):
        want = run_memory(p, "", x[b], mem_cfg)
        assert rel_err(got[b], want) <= 1e-5


MODELS = [
    ("titans_mag", "mlp2_momentum_c3_heads2", {}),
    ("titans_mag", "linear_no_momentum_c3", {}),
    ("titans_mal", "linear_momentum_c2", {}),
    ("titans_mal", "mlp2_no_momentum_c2_heads2", {}),
    ("titans_lmm", "mlp2_momentum_c3_heads2", {"num_persist_mem_tokens": 0}),
    ("titans_lmm", "linear_no_momentum_c3", {"num_persist_mem_tokens": 0}),
    ("titans_mac", "linear_momentum_c2", {"paper_order": True}),
    ("titans_mac", "mlp2_momentum_c3_heads2", {"paper_order": True, "sliding_window_attn": True}),
]


def model_config(kind, memory, extra):
    dim = 16
    model, kwargs, chunk, mem_cfg = memory_options(memory, dim)
    cfg = dict(model_type=kind, num_tokens=23, dim=dim, depth=2, segment_len=4, heads=2, dim_head=8,
               num_persist_mem_tokens=2, num_residual_streams=1, absolute_positions=False,
               neural_memory_segment_len=chunk, neural_memory_batch_size=chunk, neural_memory_model=model,
               neural_memory_kwargs=kwargs)
    cfg.update(extra)
    return cfg, mem_cfg


@pytest.mark.parametrize("kind,memory,extra", MODELS, ids=[f"{k}-{m}-{'-'.join(e)}" for k, m, e in MODELS])
def test_models_match_the_per_token_oracle(kind, memory, extra):
    cfg, mem_cfg = model_config(kind, memory, extra)
    mx.random.seed(2)
    model = build_model(cfg)
    # larger persistent tokens than their zero init, so the oracle checks where they enter
    for layer in model.layers:
        if "attn" in layer:
            layer.attn.persistent_memory = mx.random.normal(layer.attn.persistent_memory.shape)
    ids = np.random.RandomState(3).randint(0, cfg["num_tokens"], (2, 10))
    got = model(mx.array(ids))
    for b in range(2):
        assert rel_err(got[b], oracle_model(model, ids[b], cfg, mem_cfg)) <= 1e-4
