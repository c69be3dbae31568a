"""Memory networks: the small models whose weights *are* the Titans long-term memory.

Each model is a frozen dataclass (hashable, so compiled steps are shared between memories of the same shape) and a
pure function of ``(params, x)``. ``params`` is a list of arrays in titans-pytorch's ``named_parameters()`` order,
each with the same leading batch dimensions as ``x`` minus its last two (tokens, features), so one call evaluates a
different memory per (batch, head, chunk). Weights are stored ``(in, out)`` and applied as ``x @ W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, used by the memory models' norms


# MLX's CPU erf and exp are scalar loops ~100x slower than a multiply, and GELU dominates the memory update.
# Eigen's rational approximation of float32 erf (|error| < 5e-7 on [-4, 4], clamped outside) and a polynomial
# exp are plain multiply-adds that fuse under mx.compile on every backend. Coefficients: powers of x^2, highest first.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(y):
    y = mx.clip(y, -4.0, 4.0)
    t = y * y
    p, q = _ERF_P[0], _ERF_Q[0]
    for c in _ERF_P[1:]:
        p = p * t + c
    for c in _ERF_Q[1:]:
        q = q * t + c
    return y * p / q


@mx.custom_function
def _exp(x):
    """exp(x) for x <= 0 in float32 (Cody-Waite reduction, degree-7 polynomial; relative error < 3e-7)."""
    x = mx.maximum(x, -87.0)
    n = mx.floor(x * (1.0 / math.log(2.0)) + 0.5)
    g = x - n * 0.693359375 - n * -2.12194440e-4  # x - n*ln2 with ln2 split so n*ln2_hi is exact
    p = 1.0 / 5040
    for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0):
        p = p * g + c
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)  # * 2^n


# The bit-level 2^n above has no derivative in MLX (a View), and the rational erf's own derivative is only an
# approximation of the true one; so each function carries its exact derivative. Outer gradients through the
# memory's closed-form backward differentiate gelu_grad too, hence the second derivative.
@_exp.vjp
def _exp_vjp(x, cotangent, output):
    return cotangent * output


_SQRT_HALF, _INV_SQRT_2PI = math.sqrt(0.5), 1.0 / math.sqrt(2.0 * math.pi)


@mx.custom_function
def _gelu32(x):
    return 0.5 * x * (1.0 + _erf(x * _SQRT_HALF))


@mx.custom_function
def _gelu_grad32(z):
    # Phi(z) + z * phi(z)
    return 0.5 * (1.0 + _erf(z * _SQRT_HALF)) + z * _exp(-0.5 * z * z) * _INV_SQRT_2PI


@_gelu32.vjp
def _gelu32_vjp(x, cotangent, output):
    return cotangent * _gelu_grad32(x)


@_gelu_grad32.vjp
def _gelu_grad32_vjp(z, cotangent, output):
    # d/dz (Phi + z phi) = 2 phi - z^2 phi
    return cotangent * (_exp(-0.5 * z * z) * _INV_SQRT_2PI) * (2.0 - z * z)


# elementwise, so a batched call is the call itself; without these rules vmap would trace through the plain ops
# and lose the derivatives above (the gradients of non-MLP memory models are vmapped)
for _f in (_exp, _gelu32, _gelu_grad32):
    _f.vmap(lambda x, axis, f=_f: (f(x), axis))


def gelu(x: mx.array) -> mx.array:
    """Exact-erf GELU, as torch's F.gelu."""
    if x.dtype == mx.float64:
        return nn.gelu(x)
    return _gelu32(x.astype(mx.float32)).astype(x.dtype)


def gelu_grad(z: mx.array) -> mx.array:
    """d/dz GELU(z) = Phi(z) + z * phi(z)."""
    if z.dtype == mx.float64:
        return 0.5 * (1.0 + mx.erf(z * _SQRT_HALF)) + z * mx.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return _gelu_grad32(z.astype(mx.float32)).astype(z.dtype)


def _gamma(g: mx.array) -> mx.array:
    # a per-feature gain with batch dims (*B, d) applies to every token: (*B, 1, d)
    return mx.expand_dims(g, -2) + 1.0


def _layer_norm(x: mx.array) -> mx.array:
    return mx.fast.layer_norm(x, None, None, LAYER_NORM_EPS)


def _xavier(shape: tuple[int, ...]) -> mx.array:
    fan_in, fan_out = shape[-2], shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return mx.random.uniform(-bound, bound, shape)


class MemoryModel:
    """Interface: ``shapes()`` of the parameters, ``init()`` fresh values, ``__call__(params, x)``.

    ``tokenwise``: each output token depends on its own input token only (False for attention over the chunk).
    """

    tokenwise = True

    def shapes(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def init(self) -> list[mx.array]:
        return [_xavier(s) if len(s) >= 2 else mx.zeros(s) for s in self.shapes()]

    def __call__(self, params: list[mx.array], x: mx.array) -> mx.array:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class MemoryMLP(MemoryModel):
    dim: int
    depth: int
    expansion_factor: float = 2.0

    def dims(self) -> list[int]:
        hidden = int(self.dim * self.expansion_factor)
        return [self.dim, *([hidden] * (self.depth - 1)), self.dim]

    def shapes(self):
        d = self.dims()
        return [(a, b) for a, b in zip(d[:-1], d[1:])]

    def __call__(self, params, x):
        for i, w in enumerate(params):
            x = (gelu(x) if i else x) @ w
        return x


@dataclass(frozen=True)
class FactorizedMemoryMLP(MemoryModel):
    dim: int
    depth: int
    k: int = 32

    def shapes(self):
        return [s for _ in range(self.depth) for s in ((self.dim, self.k), (self.k, self.dim))]

    def __call__(self, params, x):
        for i in range(self.depth):
            x = (gelu(x) if i else x) @ params[2 * i] @ params[2 * i + 1]
        return x


@dataclass(frozen=True)
class GatedResidualMemoryMLP(MemoryModel):
    dim: int
    depth: int
    expansion_factor: float = 4.0

    def shapes(self):
        d, h = self.dim, int(self.dim * self.expansion_factor)
        # torch lists a module's own parameters before its submodules': final_proj comes first
        return [(d, d)] + [s for _ in range(self.depth) for s in ((d, h), (h, d), (2 * d, d))]

    def __call__(self, params, x):
        for i in range(self.depth):
            w1, w2, to_gates = params[1 + 3 * i : 4 + 3 * i]
            branch = gelu(x @ w1) @ w2
            gates = mx.sigmoid(mx.concatenate([branch, x], axis=-1) @ to_gates)
            x = x + gates * (branch - x)
        return x @ params[0]


@dataclass(frozen=True)
class MemorySwiGluMLP(MemoryModel):
    dim: int
    depth: int = 1
    expansion_factor: float = 4.0

    def shapes(self):
        inner = int(self.dim * self.expansion_factor * 2 / 3)
        return [s for _ in range(self.depth) for s in ((self.dim, 2 * inner), (inner, self.dim))] + [(self.dim,)]

    def __call__(self, params, x):
        for i in range(self.depth):
            a, gates = mx.split(x @ params[2 * i], 2, axis=-1)
            x = (a * gelu(gates)) @ params[2 * i + 1] + x
        return _layer_norm(x) * _gamma(params[-1])


@dataclass(frozen=True)
class MemoryAttention(MemoryModel):
    dim: int
    scale: float = 8.0
    expansion_factor: float = 2.0
    tokenwise = False

    def shapes(self):
        d, h = self.dim, int(self.dim * self.expansion_factor)
        return [(d, d), (d, d), (d, d), (d, h), (h, d)]

    def __call__(self, params, x):
        wq, wk, wv, w1, w2 = params
        l2 = lambda t: t / mx.maximum(mx.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
        q, k, v = l2(x @ wq), l2(x @ wk), x @ wv
        n = x.shape[-2]
        scores = self.scale * (q @ mx.swapaxes(k, -1, -2))
        causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
        scores = mx.where(causal, scores, -mx.inf)
        attn = mx.softmax(scores, axis=-1, precise=True) @ v
        return attn + gelu(x @ w1) @ w2


@dataclass(frozen=True)
class ResidualNorm(MemoryModel):
    """``LayerNorm(model(x)) * (gamma + 1) + x`` — titans-pytorch's default wrapper; gamma comes first in params."""

    model: MemoryModel

    @property
    def tokenwise(self):
        return self.model.tokenwise

    def shapes(self):
        return [(self.model.shapes()[0][0],), *self.model.shapes()]

    def init(self):
        return [mx.zeros(self.shapes()[0]), *self.model.init()]

    def __call__(self, params, x):
        return _layer_norm(self.model(params[1:], x)) * _gamma(params[0]) + x

    def to_dict(self):
        return {"class": "ResidualNorm", "model": self.model.to_dict()}


MEMORY_MODELS = {
    c.__name__: c for c in (MemoryMLP, FactorizedMemoryMLP, GatedResidualMemoryMLP, MemorySwiGluMLP, MemoryAttention)
}


def build_memory_model(spec: dict | MemoryModel) -> MemoryModel:
    """A memory model from its config form ``{"class": "MemoryMLP", "dim": 64, "depth": 2, ...}``."""
    if isinstance(spec, MemoryModel):
        return spec
    if not isinstance(spec, dict) or "class" not in spec:
        raise ValueError(f"a memory model is given as {{'class': name, ...kwargs}}, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("class")
    if name not in MEMORY_MODELS:
        raise ValueError(f"unknown memory model class {name!r}; expected one of {sorted(MEMORY_MODELS)}")
    try:
        return MEMORY_MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for memory model {name}: {e}") from None


# ---- closed-form backward -------------------------------------------------------------------------------------------


def _mlp_forward(weights, keys):
    """MemoryMLP forward keeping what its backward needs: each layer's input and each hidden pre-activation."""
    inputs, pre = [keys], []
    for w in weights[:-1]:
        pre.append(inputs[-1] @ w)
        inputs.append(gelu(pre[-1]))
    return inputs[-1] @ weights[-1], inputs, pre


def _mlp_backward(weights, inputs, pre, d_out, chunked):
    # each weight's gradient as its two factors (layer input, output cotangent), chunked (BH, K, c, .): the gradient
    # of chunk k is factors[0][:, k].T @ factors[1][:, k]
    factors = [None] * len(weights)
    dz = d_out
    for i in reversed(range(len(weights))):
        factors[i] = (chunked(inputs[i]), chunked(dz))
        if i:
            dz = (dz @ mx.swapaxes(weights[i], -1, -2)) * gelu_grad(pre[i - 1])
    return factors


def mlp_store_factors(model: MemoryModel, params, keys, values, lr):
    """The per-chunk gradients of ``mlp_store_grads`` before their outer products: for each weight matrix the pair
    (inputs (BH, K, c, in), output cotangents (BH, K, c, out)), whose product ``inputs.T @ cotangents`` per chunk is
    the gradient; for ResidualNorm's gain vector its gradient itself (BH, K, d). And the unweighted loss (BH, K, c).
    A memory whose weights are a sum of such products reads ``q @ W`` as ``(q @ inputs.T) @ cotangents`` (the dual
    form in memory_step): large matmuls instead of one weight-sized update per chunk."""
    bh, k, c, d = keys.shape
    residual = isinstance(model, ResidualNorm)
    weights = params[1:] if residual else params
    shared = weights[0].ndim == 3
    if shared:  # one (K*c)-row matmul beats K broadcast ones; only the weight gradients are per chunk
        keys, values, lr = keys.reshape(bh, k * c, d), values.reshape(bh, k * c, d), lr.reshape(bh, k * c)
    chunked = (lambda t: t.reshape(bh, k, c, t.shape[-1])) if shared else (lambda t: t)
    out, inputs, pre = _mlp_forward(weights, keys)
    if residual:
        centered = out - mx.mean(out, axis=-1, keepdims=True)
        inv_sigma = mx.rsqrt(mx.mean(centered * centered, axis=-1, keepdims=True) + LAYER_NORM_EPS)
        normed = centered * inv_sigma
        gain = _gamma(params[0])
        err = normed * gain + keys - values
    else:
        err = out - values
    loss = mx.mean(err * err, axis=-1).reshape(bh, k, c)
    d_pred = (2.0 / d) * mx.expand_dims(lr, -1) * err
    if not residual:
        return _mlp_backward(weights, inputs, pre, d_pred, chunked), loss
    d_gamma = mx.sum(chunked(d_pred * normed), axis=-2)
    d_norm = d_pred * gain
    # backward of (h - mean) / sigma over the feature axis
    d_out = inv_sigma * (
        d_norm - mx.mean(d_norm, axis=-1, keepdims=True) - normed * mx.mean(d_norm * normed, axis=-1, keepdims=True)
    )
    return [d_gamma, *_mlp_backward(weights, inputs, pre, d_out, chunked)], loss


def mlp_store_grads(model: MemoryModel, params, keys, values, lr):
    """Closed-form gradients of ``sum_t lr_t * mean_d (model(params, k_t) - v_t)^2`` for (ResidualNorm of) MemoryMLP.

    keys/values (BH, K, c, d), lr (BH, K, c); params either one gradient point per memory, (BH, *shape), or one
    per chunk, (BH, K, *shape). Returns per-chunk grads (BH, K, *shape) and the unweighted loss (BH, K, c).
    """
    factors, loss = mlp_store_factors(model, params, keys, values, lr)
    return [f if not isinstance(f, tuple) else mx.swapaxes(f[0], -1, -2) @ f[1] for f in factors], loss


def has_closed_form(model: MemoryModel) -> bool:
    inner = model.model if isinstance(model, ResidualNorm) else model
    return type(inner) is MemoryMLP
