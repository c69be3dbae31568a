"""The memory update as pure functions over arrays: store a block of chunks, then read with queries.

``store_block`` is the hot path: for K chunks of one (batch x head) memory it takes the per-chunk gradients of the
memory network in one batched pass, runs the momentum ("surprise") and forget-gate recurrences chunk by chunk, and
retrieves the K query windows that each new set of weights serves. It is compiled once per (structure, K) and reused
for every sequence length; hyper-parameters enter as arrays so new values do not recompile.

The recurrences run in one of two forms. The loop form applies each chunk's update to the weights and reads them,
K weight-sized updates and K small reads. The dual form (``dual_form``), for MLP memories whose recurrences are
linear (no spectral norm, gated transition, gradient clamp or learned momentum combine), writes every chunk's
weights as U_k = A_k U_0 + B_k S_0 - sum_j W_kj X_j^T D_j, with X_j, D_j the factors of chunk j's gradient, so a read
q @ U_k is A_k (q @ U_0) + B_k (q @ S_0) - ((q @ X^T) * W) @ D over all chunks at once: a few large matmuls (TTT's
dual form); the weights are formed once per DUAL_TOKENS queries. Both forms are the same arithmetic up to rounding.
``choose_form`` picks the form per compiled store, as mlx-lm's gated_delta.py picks between its ops reference and its
kernel: a kernel registered for the default device (``register_kernel``; none ships), else the dual form where it
applies, else the loop form, the reference every other form is tested against.

Layouts: b batch, H heads, BH = b*H (batch-major, as titans-pytorch's ``(b h)``), K chunks, C chunk size,
u keys per token, dh head width. Memory parameters are lists of arrays with a leading BH (and K) axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .memory_models import (MemoryModel, ResidualNorm, _gamma, _layer_norm, gelu, has_closed_form,
                            mlp_store_factors, mlp_store_grads)

ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu, "gelu": nn.gelu, "tanh": mx.tanh, "sigmoid": mx.sigmoid}


@dataclass(frozen=True)
class Structure:
    """Everything about a NeuralMemory that shapes its computation (hashable: keys the compiled-step cache)."""

    dim: int
    heads: int
    dim_head: int
    chunk_size: int
    num_kv_per_token: int
    model: MemoryModel
    views: bool
    pre_rmsnorm: bool
    qk_rmsnorm: bool
    post_rmsnorm: bool
    momentum: bool
    momentum_order: int
    learned_combine: bool
    combine_include_zeroth: bool
    layer_lr_modulation: bool
    attn_pool: bool
    weight_residual: bool
    spectral_norm: bool
    clamp_grad_norm: bool
    lookahead: bool
    gated_transition: bool
    activation: Optional[Callable] = None
    step_transform: Optional[Callable] = None  # custom adaptive_step_transform, else sigmoid * max_lr
    loss_fn: Optional[Callable] = None  # custom store loss, else mean squared error over features


def _rms_norm(x, weight, enabled=True):
    if not enabled:
        return x
    return mx.fast.rms_norm(x, weight, mx.finfo(x.dtype).eps)


def _multihead_rms_norm(x, gamma):
    # x (b, H, n, dh), gamma (H, 1, dh)
    return mx.fast.rms_norm(x, None, mx.finfo(x.dtype).eps) * (gamma + 1.0)


def _linear(p, x, bias=True):
    y = x @ p["weight"].T
    return y + p["bias"] if bias else y


def _project(s: Structure, p, x, name):
    y = _linear(p[name], x, bias=False)
    return s.activation(y) if s.activation is not None else y


@mx.custom_function
def _unstack(x):
    """x[:, 0], x[:, 1], ...: the chunks of a (BH, K, ...) array. Its vjp stacks the chunks' cotangents once; the
    vjp of K separate slices would build K zero-filled arrays of the whole size and add them."""
    return tuple(x[:, k] for k in range(x.shape[1]))


@_unstack.vjp
def _unstack_vjp(x, cotangents, outputs):
    return mx.stack(list(cotangents), axis=1)


def _expand(a, ndim):
    """Append singleton axes so a (BH, ...) gate broadcasts over a parameter's own axes."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _newton_schulz5(t, steps=5, eps=1e-7, coefs=(3.4445, -4.7750, 2.0315)):
    # orthogonalise each matrix of the update (Muon); vectors are left alone
    if t.ndim < 3:  # t is (BH, *shape): only matrix-shaped parameters
        return t
    transpose = t.shape[-2] > t.shape[-1]
    if transpose:
        t = mx.swapaxes(t, -1, -2)
    norm = mx.sqrt(mx.sum(t * t, axis=(-2, -1), keepdims=True))
    t = t / mx.maximum(norm, eps)
    a, b, c = coefs
    for _ in range(steps):
        A = t @ mx.swapaxes(t, -1, -2)
        t = a * t + (b * A + c * (A @ A)) @ t
    return mx.swapaxes(t, -1, -2) if transpose else t


def _softclamp_norm(g, max_norm, batch_axes):
    # titans-pytorch's softclamp_grad_norm: rescale each (bh, chunk) gradient to max/2 * (tanh(2|g|/max) + 1)
    axes = tuple(range(batch_axes, g.ndim))
    norm = mx.sqrt(mx.sum(g * g, axis=axes, keepdims=True))
    half = max_norm / 2
    return g * ((mx.tanh(norm / half) * half + half) / norm)


def autodiff_grads(s: Structure, params, keys, values, lr):
    """Per-chunk gradients by ``mx.vmap(mx.value_and_grad)``: the general path, for any memory model or loss."""
    bh, k = keys.shape[:2]
    flat = lambda t: t.reshape(bh * k, *t.shape[2:])
    # one gradient point per memory (BH, *shape) or per chunk (BH, K, *shape) -> one per chunk, flattened
    params = [w if w.ndim == len(shape) + 2 else mx.expand_dims(w, 1) for w, shape in zip(params, s.model.shapes())]
    params = [flat(mx.broadcast_to(w, (bh, k) + w.shape[2:])) for w in params]

    def loss(ps, kk, vv, ll):
        pred = s.model(ps, kk)
        per_token = mx.mean((pred - vv) ** 2, axis=-1) if s.loss_fn is None else s.loss_fn(pred, vv)
        return mx.sum(per_token * ll), per_token

    (_, per_token), grads = mx.vmap(mx.value_and_grad(loss))(params, flat(keys), flat(values), flat(lr))
    unflat = lambda t: t.reshape(bh, k, *t.shape[1:])
    return [unflat(g) for g in grads], unflat(per_token)


def chunk_grads(s: Structure, params, keys, values, lr):
    """Per-chunk gradients of the weighted store loss and the unweighted per-token loss.

    params (BH, *shape) shared by all chunks, or (BH, K, *shape); keys/values (BH, K, c, dh), lr (BH, K, c).
    """
    if s.loss_fn is None and has_closed_form(s.model):
        return mlp_store_grads(s.model, params, keys, values, lr)
    return autodiff_grads(s, params, keys, values, lr)


def _heads_last(t, b, H):
    # (b, n, H*x) -> (b*H, n, x)
    n = t.shape[1]
    return t.reshape(b, n, H, -1).transpose(0, 2, 1, 3).reshape(b * H, n, -1)


def _queries(s: Structure, p, x):
    """x (b, n, dim) query-view tokens -> their normed form (b, n, dim) and queries (BH, n, dh)."""
    b, n, _ = x.shape
    x = _rms_norm(x, p.get("retrieve_norm", {}).get("weight"), s.pre_rmsnorm)
    q = _project(s, p, x, "to_queries").reshape(b, n, s.heads, s.dim_head).transpose(0, 2, 1, 3)
    if s.qk_rmsnorm:
        q = _multihead_rms_norm(q, p["q_norm"]["gamma"])
    return x, q.reshape(b * s.heads, n, s.dim_head)


def _read_out(s: Structure, p, y, x):
    """Memory outputs y (BH, n, dh) -> the layer's output (b, n, dim): post norm, per-head gate, head merge."""
    b, n, _ = x.shape
    H, dh = s.heads, s.dim_head
    y = y.reshape(b, H, n, dh)
    if s.post_rmsnorm:
        y = _multihead_rms_norm(y, p["multihead_rmsnorm"]["gamma"])
    if H > 1:
        gate = mx.sigmoid(_linear(p["retrieve_gate"], x, bias=False))  # (b, n, H)
        y = y * mx.expand_dims(gate.transpose(0, 2, 1), -1)
    y = y.transpose(0, 2, 1, 3).reshape(b, n, H * dh)
    return _linear(p["combine_heads"], y, bias=False) if H > 1 else y


def retrieve(s: Structure, p, weights, x):
    """Read one memory per (batch, head), weights (BH, *shape), with x (b, n, dim) query-view tokens."""
    x, q = _queries(s, p, x)
    return _read_out(s, p, s.model(weights, q), x)


DUAL_TOKENS = 256  # queries per dual-form sub-block: its (q @ X^T) is DUAL_TOKENS^2 per head, then weights are formed
DUAL_FORM = True  # False: always the loop form (read when a block is traced; bench --impl mlx-loop, the agreement tests)
# The dual form does more arithmetic in fewer, larger ops; it wins for small chunks, where the loop form's K
# weight-sized updates dominate (NeuralMemory(dim=384), 4K tokens, 1 CPU thread + OpenBLAS: chunk 8 2.0-2.3x,
# chunk 16 1.05-1.4x, chunk 32 0.9-1.0x, chunk 64 0.75-0.95x of the loop form's tokens/s)
DUAL_MAX_CHUNK = 16


def dual_form(s: Structure, want_updates: bool, want_stats: bool, K: int) -> bool:
    """Whether store_block runs the recurrences in the dual form (see the module docstring)."""
    return (DUAL_FORM and K > 1 and s.chunk_size <= DUAL_MAX_CHUNK and s.loss_fn is None and has_closed_form(s.model)
            and not want_updates and not want_stats
            and not (s.spectral_norm or s.gated_transition or s.clamp_grad_norm or s.learned_combine
                     or s.weight_residual or (s.momentum and s.momentum_order != 1)))


def _segment_weights(log_a, v):
    """G (BH, K, K): G[k, m] = v_m * prod_{m < i <= k} a_i for m <= k, else 0, from log a (BH, K) and v (K,)."""
    cum = mx.cumsum(log_a, axis=-1)
    K = log_a.shape[-1]
    lower = mx.arange(K)[:, None] >= mx.arange(K)[None, :]
    diff = mx.where(lower, cum[:, :, None] - cum[:, None, :], -mx.inf)
    return mx.exp(diff) * v, mx.exp(cum)


def _dual_store(s: Structure, factors, decay, eta, mod, valid, U, S, queries):
    """The recurrences and reads of K chunks in the dual form: (U, S, reads (BH, K*C, dh)).

    factors: mlp_store_factors' output (per parameter (X, D) each (BH, K, c, .), or a vector gradient (BH, K, d));
    decay (BH, K); eta (BH, K) or None; mod (params, BH, K) or None; U: list (BH, *shape); S: list (1, BH, *shape)
    or None; queries (BH, K*C, dh). Chunk k: S_k = e_k S_{k-1} - v_k g_k, U_k = a_k U_{k-1} + v_k S_k (momentum) or
    U_k = a_k U_{k-1} - v_k g_k, with a = 1 - decay, e = eta, v = 1 on valid chunks and a = e = 1, v = 0 on padding.
    So U_k = A_k U_0 + B_k S_0 - sum_j W_kj g_j and S_k = E_k S_0 - sum_j G_kj g_j, the coefficients products of gates.
    """
    bh, K = decay.shape
    C = queries.shape[1] // K
    residual = isinstance(s.model, ResidualNorm)
    sub = max(1, DUAL_TOKENS // C)
    v = valid.astype(decay.dtype)
    log_a = mx.where(valid, mx.log1p(-decay), 0.0)
    log_e = mx.where(valid, mx.log(eta), 0.0) if eta is not None else None
    U, S = list(U), (None if S is None else [m[0] for m in S])
    rows = lambda t: mx.repeat(t, C, axis=1)[..., None]  # per chunk (BH, n) -> per query row (BH, n*C, 1)
    reads = []
    for k0 in range(0, K, sub):
        k1 = min(K, k0 + sub)
        n = k1 - k0
        Ga, A = _segment_weights(log_a[:, k0:k1], v[k0:k1])  # U_k's weights on S_m (momentum) or on -g_m
        if S is not None:
            G, E = _segment_weights(log_e[:, k0:k1], v[k0:k1])  # S_m's weights on -g_j, and on S_0
            W, B = Ga @ G, Ga @ E[..., None]
        else:
            W, B = Ga, None

        def weights(coef, i):  # the chunk-pair weights of parameter i: its modulation scales the source chunk
            return coef if mod is None else coef * mod[i][:, None, k0:k1]

        def flat(t):
            return t[:, k0:k1].reshape(bh, -1, t.shape[-1])  # (BH, K, c, .) -> (BH, n*c, .)

        def matmul(i, h):
            # h (BH, n*C, in): the rows of chunk k times parameter i after chunk k
            X, D = factors[i]
            c = X.shape[2]
            if S is None:
                out = rows(A) * (h @ U[i])
            else:  # one matmul for both terms
                both = h @ mx.concatenate([U[i], S[i]], axis=-1)
                out = rows(A) * both[..., :U[i].shape[-1]] + rows(B[..., 0]) * both[..., U[i].shape[-1]:]
            mask = mx.broadcast_to(weights(W, i)[:, :, None, :, None], (bh, n, C, n, c)).reshape(bh, n * C, n * c)
            return out - ((h @ mx.swapaxes(flat(X), -1, -2)) * mask) @ flat(D)

        q = queries[:, k0 * C:k1 * C]
        first = 1 if residual else 0
        h = q
        for i in range(first, len(factors)):
            h = matmul(i, gelu(h) if i > first else h)
        if residual:  # the gain vector, per chunk: small enough to form for every chunk
            g = factors[0][:, k0:k1]
            gamma = A[..., None] * U[0][:, None] - weights(W, 0) @ g
            if S is not None:
                gamma = gamma + B * S[0][:, None]
            per_chunk = lambda t: t.reshape(bh, n, C, t.shape[-1])  # (BH, n*C, d) -> (BH, n, C, d)
            h = (_layer_norm(per_chunk(h)) * _gamma(gamma) + per_chunk(q)).reshape(h.shape)  # as ResidualNorm
        reads.append(h)

        # the state after the sub-block: its last chunk's row of the coefficients
        newU, newS = [], []
        for i, f in enumerate(factors):
            wu = weights(W, i)[:, -1]  # (BH, n)
            if not isinstance(f, tuple):  # the gain vector
                g = f[:, k0:k1]
                newU.append(A[:, -1:] * U[i] - mx.sum(wu[..., None] * g, axis=1)
                            + (B[:, -1] * S[i] if S is not None else 0.0))
                if S is not None:
                    newS.append(E[:, -1:] * S[i] - mx.sum(weights(G, i)[:, -1][..., None] * g, axis=1))
                continue
            X, D = f
            c = X.shape[2]
            per_row = lambda w: mx.repeat(w, c, axis=1)[..., None]  # (BH, n) -> (BH, n*c, 1)
            Dw = flat(D) * per_row(wu)
            if S is not None:  # both sums in one matmul
                Dw = mx.concatenate([Dw, flat(D) * per_row(weights(G, i)[:, -1])], axis=-1)
            sums = mx.swapaxes(flat(X), -1, -2) @ Dw
            width = U[i].shape[-1]
            newU.append(_expand(A[:, -1], U[i].ndim) * U[i] - sums[..., :width]
                        + (_expand(B[:, -1, 0], U[i].ndim) * S[i] if S is not None else 0.0))
            if S is not None:
                newS.append(_expand(E[:, -1], S[i].ndim) * S[i] - sums[..., width:])
        U, S = newU, (newS if S is not None else None)
    reads = mx.concatenate(reads, axis=1) if len(reads) > 1 else reads[0]
    return U, (None if S is None else [m[None] for m in S]), reads


@dataclass
class Chunks:
    """What the recurrences of K chunks of one (batch x head) memory take, the projections done (see store_block):
    point, the gradient point per parameter, (BH, *shape) or (BH, K, *shape) with a weight residual; keys and
    values (BH, K, c, dh) and lr (BH, K, c), c = C*u (less one with lookahead values); the per-chunk gates decay
    (BH, K), eta (order, BH, K) or None, mod (params, BH, K) or None, combine (orders, BH, K) or None; valid and
    boundary (K,) bool; queries (BH, K*C, dh), normed and projected."""

    point: list
    keys: mx.array
    values: mx.array
    lr: mx.array
    decay: mx.array
    eta: Optional[mx.array]
    mod: Optional[mx.array]
    combine: Optional[mx.array]
    valid: mx.array
    boundary: mx.array
    queries: mx.array


# A form of the recurrences (the shape of mlx-lm's gated_delta.py: an ops reference, faster forms, one function
# choosing): form(s, hp, chunks, grad_point, last_update, momentum, want_updates, want_stats) -> (last_update,
# momentum, reads (BH, K*C, dh) before the read-out, updates or None, loss (BH, K, c), (update norms, weight norms)
# (BH, K) each with want_stats, else None). The loop form is the reference; the dual form is the same arithmetic in
# fewer, larger ops. A backend's kernel slots in with register_kernel; none ships (none could be measured here).
KERNELS: dict = {}  # device type ("gpu", "cpu") -> list of (fits(s, K, want_updates, want_stats) -> bool, form)


def register_kernel(device: str, fits: Callable, form: Callable) -> None:
    """Make ``form`` (the signature above) what store_block runs on ``device`` ("gpu" or "cpu", the default
    device's type) wherever ``fits(s, K, want_updates, want_stats)``, outside training only (``NeuralMemory.training``
    False: a kernel need not be differentiable, as mlx-lm uses its gated-delta kernel). It must agree with the loop
    form (tests/test_memory_forms.py shows how to check)."""
    KERNELS.setdefault(device, []).append((fits, form))


def forms_key() -> tuple:
    """What the choice of form depends on besides the arguments: part of every compiled store's cache key."""
    return DUAL_FORM, str(mx.default_device()), tuple((d, id(f)) for d, entries in KERNELS.items() for _, f in entries)


def choose_form(s: Structure, want_updates: bool, want_stats: bool, K: int, use_kernel: bool = True) -> Callable:
    """The form store_block runs: a kernel registered for the default device where it fits (``use_kernel``), else
    the dual form where it applies, else the loop form (the reference)."""
    if use_kernel:
        for fits, form in KERNELS.get(mx.default_device().type.name, []):
            if fits(s, K, want_updates, want_stats):
                return form
    return dual_store if dual_form(s, want_updates, want_stats, K) else loop_store


def dual_store(s: Structure, hp, c: Chunks, grad_point, last_update, momentum, want_updates, want_stats):
    """The recurrences in the dual form (see the module docstring; where dual_form applies)."""
    factors, loss = mlp_store_factors(s.model, c.point, c.keys, c.values, c.lr)
    U, S, reads = _dual_store(s, factors, c.decay, None if c.eta is None else c.eta[0], c.mod, c.valid, last_update,
                              momentum, c.queries)
    return U, S, reads, None, loss, None


def loop_store(s: Structure, hp, c: Chunks, grad_point, last_update, momentum, want_updates, want_stats):
    """The recurrences chunk by chunk (the reference form; every option): S = eta*S - grad (per order),
    U = (1 - alpha)*U + S; each new U serves the next window of C queries."""
    K = c.decay.shape[1]
    grads, loss = chunk_grads(s, c.point, c.keys, c.values, c.lr)
    if s.clamp_grad_norm:
        grads = [_softclamp_norm(g, hp["max_grad_norm"], 2) for g in grads]
    if c.mod is not None:
        grads = [_expand(m, g.ndim) * g for m, g in zip(c.mod, grads)]

    # The momentum never depends on U, so every chunk's update is known first and Newton-Schulz (spectral norm)
    # runs once on all K of them, batched: a few large matmuls instead of K rounds of small ones. (Reading chunk by
    # chunk, not stacking K weight copies, is faster and lighter.)
    S = list(momentum) if s.momentum else None
    deltas = []
    for i, g in enumerate(grads):
        per_chunk_delta = []
        chunk_grads_i = _unstack(g)
        for k in range(K):
            surprise = -chunk_grads_i[k]
            delta = surprise
            if s.momentum:
                orders, x = [], surprise
                for o in range(s.momentum_order):
                    x = _expand(c.eta[o, :, k], x.ndim) * S[i][o] + x
                    orders.append(x)
                if s.learned_combine:
                    terms = ([surprise] if s.combine_include_zeroth else []) + orders
                    delta = sum(_expand(c.combine[j, :, k], t.ndim) * t for j, t in enumerate(terms))
                else:
                    delta = orders[-1]
                S[i] = mx.where(c.valid[k], mx.stack(orders), S[i])
            per_chunk_delta.append(delta)
        if s.spectral_norm:
            stacked = mx.stack(per_chunk_delta, axis=1)  # (BH, K, *shape) -> one batch of BH*K matrices
            stacked = _newton_schulz5(stacked.reshape(-1, *stacked.shape[2:])).reshape(stacked.shape)
            per_chunk_delta = list(_unstack(stacked))
        deltas.append(per_chunk_delta)

    bh, C = c.queries.shape[0], c.queries.shape[1] // K
    chunk_queries = _unstack(c.queries.reshape(bh, K, C, -1))
    U = list(last_update)
    reads, updates, weight_norms = [], [], []
    for k in range(K):
        for i in range(len(U)):
            new = mx.where(c.valid[k], _expand(1.0 - c.decay[:, k], U[i].ndim) * U[i] + deltas[i][k], U[i])
            if s.gated_transition:  # at a mini-batch boundary ease from the gradient point to the new weights
                W = grad_point[i]
                new = mx.where(c.boundary[k], W + hp["transition_gate"] * (new - W), new)
            U[i] = new
        reads.append(s.model(U, chunk_queries[k]))
        if want_updates:
            updates.append(list(U))
        if want_stats:
            weight_norms.append(_norm(U))
    reads = mx.stack(reads, axis=1).reshape(bh, K * C, -1)
    updates = [mx.stack(us, axis=1) for us in zip(*updates)] if want_updates else None
    if not want_stats:
        return U, S, reads, updates, loss, None
    update_norms = mx.where(c.valid, mx.stack([_norm([d[k] for d in deltas]) for k in range(K)], axis=1), 0.0)
    return U, S, reads, updates, loss, (update_norms, mx.stack(weight_norms, axis=1))


def store_block(s: Structure, want_updates: bool, p, hp, grad_point, last_update, momentum, store_x, valid, boundary,
                retrieve_x, prev, want_stats: bool = False, use_kernel: bool = True):
    """Store K chunks and read the K windows they serve.

    grad_point/last_update: lists (BH, *shape); momentum: list (order, BH, *shape) or None;
    store_x: (b, K*C, dim) or (2, b, K*C, dim) raw store tokens; valid: (K,) bool (padding chunks are False);
    boundary: (K,) bool, True where a chunk ends a TTT mini-batch (the gated transition applies there);
    retrieve_x: (b, K*C, dim) raw query tokens of the windows; prev: list (BH, K, *shape) of the previous memory
    layer's weights before each chunk (weight residual) or None; hp: dict of hyper-parameter arrays; use_kernel:
    whether a registered kernel may run the recurrences (see choose_form).
    Returns (last_update, momentum, retrieved (b, K*C, dim), updates (list (BH, K, *shape), if want_updates),
    (loss, lr) (BH, K, c')). With want_stats (what ``python -m titans_mlx.inspect`` draws; off in the hot path) the
    last item also holds, each (BH, K): the forget gate alpha of each chunk, the norm of the update it added (the
    momentum term, over all parameters; 0 for a chunk not written) and the norm of the weights after it.
    """
    H, dh, C, u = s.heads, s.dim_head, s.chunk_size, s.num_kv_per_token
    norm_w = p.get("store_norm", {}).get("weight")
    if s.views:
        kx, vx = _rms_norm(store_x[0], norm_w, s.pre_rmsnorm), _rms_norm(store_x[1], norm_w, s.pre_rmsnorm)
    else:
        kx = vx = _rms_norm(store_x, norm_w, s.pre_rmsnorm)
    b, n, _ = kx.shape
    K = n // C

    # per-token learning rates and keys/values, grouped (BH, K, C*u, ...)
    lr_logits = _linear(p["to_adaptive_step"], kx)
    lr = s.step_transform(lr_logits) if s.step_transform else mx.sigmoid(lr_logits) * hp["max_lr"]
    lr = _heads_last(lr, b, H).reshape(b * H, K, C * u)
    keys = _project(s, p, kx, "to_keys").reshape(b, n, H, u * dh).transpose(0, 2, 1, 3).reshape(b, H, n * u, dh)
    if s.qk_rmsnorm:
        keys = _multihead_rms_norm(keys, p["k_norm"]["gamma"])
    keys = keys.reshape(b * H, K, C * u, dh)
    values = _heads_last(_project(s, p, vx, "to_values"), b, H).reshape(b * H, K, C * u, dh)

    # per-chunk gates from the chunk representation (mean, or attention pooling)
    chunks = kx.reshape(b, K, C, -1)
    if s.attn_pool:
        attn = mx.softmax(_linear(p["reduce_to_chunk_rep"]["to_attn_logits"], chunks), axis=-2, precise=True)
        rep = mx.sum(chunks * attn, axis=-2)
    else:
        rep = mx.mean(chunks, axis=-2)

    def per_chunk(name, groups=1, fn=mx.sigmoid):  # (b, K, H*groups) -> (groups, BH, K)
        g = fn(_linear(p[name], rep)) if fn else _linear(p[name], rep)
        return g.reshape(b, K, H, groups).transpose(3, 0, 2, 1).reshape(groups, b * H, K)

    decay = per_chunk("to_decay_factor")[0]

    # gradients of the memory network at the gradient point (plus the previous layer's weights, weight residual)
    if s.weight_residual:
        mix = per_chunk("to_learned_weight_residual_mix")[0]
        point = [mx.expand_dims(w, 1) + _expand(mix, t.ndim) * t for w, t in zip(grad_point, prev)]
    else:
        point = grad_point
    if s.lookahead:  # train each key on the next token's value, within the chunk
        keys, values, lr = keys[:, :, :-1], values[:, :, 1:], lr[:, :, :-1]
    mod = (per_chunk("to_layer_modulation", len(grad_point)) * hp["max_mem_layer_modulation"]
           if s.layer_lr_modulation else None)
    eta = per_chunk("to_momentum", s.momentum_order) if s.momentum else None
    combine = None
    if s.momentum and s.learned_combine:
        orders = s.momentum_order + int(s.combine_include_zeroth)
        combine = mx.softmax(per_chunk("to_learned_momentum_combine", orders, fn=None), axis=0, precise=True)
    rx, queries = _queries(s, p, retrieve_x)
    chunks = Chunks(point, keys, values, lr, decay, eta, mod, combine, valid, boundary, queries)
    form = choose_form(s, want_updates, want_stats, K, use_kernel)
    U, S, reads, updates, loss, stats = form(s, hp, chunks, grad_point, last_update, momentum, want_updates,
                                             want_stats)
    retrieved = _read_out(s, p, reads, rx)
    if not want_stats:
        return U, S, retrieved, updates, (loss, lr)
    return U, S, retrieved, updates, (loss, lr, decay) + stats


def _norm(tensors):
    """Euclidean norm over all of a memory's parameters, each (BH, *shape): (BH,)."""
    return mx.sqrt(sum(mx.sum(t * t, axis=tuple(range(1, t.ndim))) for t in tensors))
