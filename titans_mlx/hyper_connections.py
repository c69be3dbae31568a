"""Residual-stream hyper-connections of titans-pytorch's MemoryAsContextTransformer.

Two variants, both with the checkpoint's parameter names (no renames needed):

* mHC (titans-pytorch >= 0.5.0, hyper-connections 0.4.11 ``ManifoldConstrainedHyperConnections``): sigmoid pre-weights,
  Sinkhorn-projected (doubly stochastic) residual mixing, ``2 * sigmoid`` post-weights; the mixing runs in float32.
* legacy HC (titans-pytorch <= 0.4.25, hyper-connections ``HyperConnections``): tanh-scaled dynamic weights, computed
  in the input dtype. Up to hyper-connections 0.3.9 (what titans-pytorch 0.4.x resolved to through its releases,
  e.g. 0.3.8 for 0.4.25) the residual streams are NOT mixed: the width connection's residual output is discarded and
  the branch output is added to the unmixed streams. hyper-connections >= 0.3.10 mixes them; the key names are the
  same, so pick that behaviour with ``legacy_mix_residuals=True``.

Streams are laid out as (b, n, s, d); torch keeps them as (b*s, n, d) with the stream index minor, i.e.
``rearrange(t, '(b s) n d -> b n s d')`` maps a torch tensor to this layout.
"""

import random
from functools import partial
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn

SINKHORN_ITERS = 20
NORM_EPS = 1e-12  # F.normalize default, for both the L2 (RMSNorm) and the L1 (Sinkhorn) normalisations

MHC_ONLY_KEYS = frozenset({"pre_branch_scale", "residual_scale", "h_post_scale"})
LEGACY_ONLY_KEYS = frozenset({"dynamic_alpha_scale", "dynamic_beta_scale"})


class _RMSNorm(nn.Module):
    """hyper-connections' RMSNorm: x / max(||x||, eps) * sqrt(d) * (gamma + 1), in the input dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.zeros((dim,))
        self._scale = dim**0.5

    def __call__(self, x: mx.array) -> mx.array:
        norm = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True)).astype(x.dtype)
        # torch multiplies by the Python-float scale in float32 before rounding (sqrt(d) is not exact in bf16)
        unit = x / mx.maximum(norm, NORM_EPS)
        return (unit.astype(mx.float32) * self._scale).astype(x.dtype) * (self.gamma + 1)


@partial(mx.compile, shapeless=True)
def _sinkhorn(logits: mx.array) -> mx.array:
    # logits (..., from, to); the max is taken over `from` (dim -2), then alternate L1 normalisation over -2 and -1.
    # Compiled: 20 iterations on 4x4 matrices are ~200 tiny ops, half of a decode step's op count uncompiled.
    # The entries are exp(.) >= 0, so the L1 norm is the plain sum.
    a = mx.exp(logits - mx.max(logits, axis=-2, keepdims=True))
    for _ in range(SINKHORN_ITERS):
        a = a / mx.maximum(mx.sum(a, axis=-2, keepdims=True), NORM_EPS)
        a = a / mx.maximum(mx.sum(a, axis=-1, keepdims=True), NORM_EPS)
    return a


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)


def _mix(alpha: mx.array, streams: mx.array) -> mx.array:
    # alpha (b, n, s, k), streams (b, n, s, d) -> (b, n, k, d): column j of alpha weighs the streams into output j
    # (a matmul, so half-precision inputs accumulate in float32 and round once, like torch's einsum)
    return mx.swapaxes(alpha, -1, -2) @ streams


class HyperConnection(nn.Module):
    """One hyper-connection around a branch (memory, attention or feedforward) of the MAC.

    ``branch_in, finish = hc(streams)`` maps streams (b, n, s, d) to the branch input (b, n, d);
    ``finish(branch_out)`` returns the new streams (b, n, s, d). With ``add_branch_out_to_residual=False`` (the MAC's
    memory branch in gate mode) there are no beta parameters and, as in the package, ``finish`` returns
    ``branch_out`` unchanged (the MAC never calls it then).
    """

    def __init__(
        self,
        dim: int,
        num_streams: int,
        legacy: bool = False,
        add_branch_out_to_residual: bool = True,
        legacy_mix_residuals: bool = False,
    ):
        super().__init__()
        if num_streams < 2:
            raise ValueError(f"HyperConnection needs num_streams >= 2 (got {num_streams}); one stream is a plain residual")
        self.num_streams = num_streams
        self.legacy = legacy
        self.add_branch_out_to_residual = add_branch_out_to_residual
        self.legacy_mix_residuals = legacy_mix_residuals
        s = num_streams
        self.norm = _RMSNorm(dim)
        # column 0 weighs the streams into the branch input, columns 1.. mix stream `from` (row) into stream `to`;
        # fresh models read one stream drawn with Python's `random`, as the package does (checkpoints overwrite it)
        pre = mx.zeros((s, 1))
        pre[random.randrange(s)] = 1.0
        self.static_alpha = mx.concatenate([pre, mx.eye(s)], axis=1)
        if legacy:
            self.dynamic_alpha_fn = mx.zeros((dim, s + 1))
            self.dynamic_alpha_scale = mx.array(1e-2)
        else:
            self.dynamic_alpha_fn = mx.zeros((1, dim, s + 1))  # leading axis: number of alpha proposals (1 in MAC)
            self.pre_branch_scale = mx.array([1e-2])
            self.residual_scale = mx.array([1e-2])
        if add_branch_out_to_residual:
            self.static_beta = mx.ones((s,))
            self.dynamic_beta_fn = mx.zeros((dim,))
            if legacy:
                self.dynamic_beta_scale = mx.array(1e-2)
            else:
                self.h_post_scale = mx.array(1e-2)

    @staticmethod
    def is_legacy_state_dict(keys: Iterable[str]) -> bool:
        """True for plain-HC checkpoints (titans-pytorch <= 0.4.25), False for mHC ones or ones without HC keys."""
        names = {k.rsplit(".", 1)[-1] for k in keys}
        legacy, mhc = bool(names & LEGACY_ONLY_KEYS), bool(names & MHC_ONLY_KEYS)
        if legacy and mhc:
            raise ValueError("state dict mixes legacy hyper-connection keys (dynamic_alpha_scale) with mHC keys (pre_branch_scale)")
        return legacy

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint names -> MLX names for the keys under a hyper-connection: identical in both variants
        (static_alpha, dynamic_alpha_fn, ..., norm.gamma), so this returns ``weights`` unchanged. The stream
        embedding ``expand_streams.stream_embed`` also keeps its name (see ``StreamEmbed``)."""
        return weights

    def __call__(self, streams: mx.array) -> tuple[mx.array, Callable[[mx.array], mx.array]]:
        if self.legacy:
            return self._legacy(streams)
        return self._mhc(streams)

    def _mhc(self, streams: mx.array) -> tuple[mx.array, Callable[[mx.array], mx.array]]:
        s, dtype = self.num_streams, streams.dtype
        # the norm runs in the input dtype, everything after it in float32, results are cast back (as the package)
        normed = self.norm(streams).astype(mx.float32)
        x = streams.astype(mx.float32)
        scale = mx.concatenate([_f32(self.pre_branch_scale), mx.repeat(_f32(self.residual_scale), s)])
        alpha = (normed @ _f32(self.dynamic_alpha_fn[0])) * scale + _f32(self.static_alpha)  # (b, n, s, 1+s)
        alpha = mx.concatenate([mx.sigmoid(alpha[..., :1]), _sinkhorn(alpha[..., 1:])], axis=-1)
        if not self.add_branch_out_to_residual:
            return _mix(alpha[..., :1], x)[..., 0, :].astype(dtype), lambda branch_out: branch_out
        mixed = _mix(alpha, x)
        branch_in, residual = mixed[..., 0, :].astype(dtype), mixed[..., 1:, :].astype(dtype)
        dyn_beta = (normed @ _f32(self.dynamic_beta_fn)) * _f32(self.h_post_scale)
        beta = (mx.sigmoid(dyn_beta + _f32(self.static_beta)) * 2).astype(dtype)  # (b, n, s)

        def finish(branch_out: mx.array) -> mx.array:
            # beta is rounded to the stream dtype first, the product is taken in float32, then rounded again
            added = branch_out.astype(mx.float32)[..., None, :] * beta.astype(mx.float32)[..., None]
            return added.astype(dtype) + residual

        return branch_in, finish

    def _legacy(self, streams: mx.array) -> tuple[mx.array, Callable[[mx.array], mx.array]]:
        normed = self.norm(streams)
        alpha = mx.tanh(normed @ self.dynamic_alpha_fn) * self.dynamic_alpha_scale + self.static_alpha
        if not self.add_branch_out_to_residual:
            return _mix(alpha[..., :1], streams)[..., 0, :], lambda branch_out: branch_out
        if self.legacy_mix_residuals:
            mixed = _mix(alpha, streams)
            branch_in, residual = mixed[..., 0, :], mixed[..., 1:, :]
        else:
            # hyper-connections <= 0.3.9 computes the mixed streams but returns the input streams as the residual
            branch_in, residual = _mix(alpha[..., :1], streams)[..., 0, :], streams
        beta = mx.tanh(normed @ self.dynamic_beta_fn) * self.dynamic_beta_scale + self.static_beta  # (b, n, s)

        def finish(branch_out: mx.array) -> mx.array:
            return residual + branch_out[..., None, :] * beta[..., None]

        return branch_in, finish


def expand_streams(x: mx.array, stream_embed: mx.array) -> mx.array:
    """(b, n, d) -> (b, n, s, d): every stream starts as x, plus its learned embedding ``stream_embed`` (s, d)."""
    return x[..., None, :] + stream_embed


def reduce_streams(streams: mx.array) -> mx.array:
    """(b, n, s, d) -> (b, n, d): sum over the streams."""
    return mx.sum(streams, axis=-2)


class StreamEmbed(nn.Module):
    """Holds ``stream_embed`` (s, d) under the checkpoint's name: assign it as ``expand_streams`` in the model."""

    def __init__(self, num_streams: int, dim: int):
        super().__init__()
        self.stream_embed = mx.zeros((num_streams, dim))

    def __call__(self, x: mx.array) -> mx.array:
        return expand_streams(x, self.stream_embed)
