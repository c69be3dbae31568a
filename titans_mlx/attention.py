"""Segmented (block-diagonal) and sliding-window attention of the MAC transformer.

Positions are global positions in the sequence *with* long-term memory tokens interleaved. A call processes
the positions [start, start + n); keys and values of earlier positions that the new queries can still see
come from the cache (rotated at their own positions, values already mixed with the value residual), so any
split of a sequence into calls gives the one-call result.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def wide(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype sensitive steps compute in: float32 for half precision and float32, float64 for float64."""
    return mx.float64 if dtype == mx.float64 else mx.float32


class RMSNorm(nn.Module):
    """x / rms(x) * weight with torch's nn.RMSNorm(eps=None) epsilon, finfo(x.dtype).eps, for float32 and float64.

    In half precision the epsilon stays float32's: torch's finfo(bfloat16).eps is 2^-7, large enough against the
    mean square of some layers' inputs to change the normalisation the model was trained with (the bundled model cast
    to bfloat16: +1.8% bits/byte with it, +0.006% with float32's; demo/check_half_precision.py)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), mx.finfo(wide(x.dtype)).eps)


class RotaryEmbedding(nn.Module):
    """GPT-J style (interleaved pairs) rotary embedding; `freqs` is checkpoint state, angles in float32."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        exponent = mx.arange(0, dim, 2).astype(mx.float32) / dim
        self.freqs = 1.0 / mx.power(mx.array(theta, dtype=mx.float32), exponent)
        self.freeze(keys=["freqs"])  # saved with the checkpoint, never trained (requires_grad=False in torch)

    def __call__(self, x: mx.array, start) -> mx.array:
        # x (..., n, dh) at positions start .. start + n - 1; same float32 angles as rotary-embedding-torch
        n = x.shape[-2]
        pos = mx.arange(n, dtype=mx.float32) + start  # start: an int or an int array (the compiled decode step)
        angles = pos[:, None] * self.freqs.astype(mx.float32)[None, :]
        cos, sin = mx.cos(angles), mx.sin(angles)
        xf = x.astype(wide(x.dtype))
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = mx.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.reshape(x.shape).astype(x.dtype)


def _lerp(start: mx.array, end: mx.array, weight: mx.array) -> mx.array:
    # torch.lerp's two-branch formula (exact at weight 0 and 1)
    diff = end - start
    return mx.where(mx.abs(weight) < 0.5, start + weight * diff, end - diff * (1 - weight))


def _pad_axis(x: mx.array, axis: int, before: int, after: int) -> mx.array:
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return mx.pad(x, widths)


class SegmentedAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        segment_len: int,
        num_persist_mem_tokens: int = 0,
        num_longterm_mem_tokens: int = 0,
        dim_head: int = 64,
        heads: int = 8,
        sliding: bool = False,
        accept_value_residual: bool = False,
    ):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.window = segment_len + num_longterm_mem_tokens
        self.sliding = sliding
        self.num_persist = num_persist_mem_tokens
        self.scale = dim_head**-0.5

        self.norm = RMSNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if accept_value_residual:
            self.to_learned_v_mix = nn.Linear(dim, heads)
        self.persistent_memory = mx.zeros((2, heads, num_persist_mem_tokens, dim_head))

    def _split_heads(self, t: mx.array) -> mx.array:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(0, 2, 1, 3)

    def __call__(
        self,
        x: mx.array,
        start: int = 0,
        value_residual: Optional[mx.array] = None,
        cache=None,
        output_gating: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """x (b, n, dim) at global positions start..start+n-1 -> (out (b, n, dim), unmixed values (b, h, n, dh)).

        cache: an mlx-lm ChunkedKVCache (see titans_mlx.cache), whose keys/values, offset and start_position this
        sets itself: what stays visible is decided by the segment layout, not by a count of keys.
        """
        b, n, _ = x.shape
        q, k, v, orig_v = self._project(x, start, value_residual)

        k_start = start
        if cache is not None:
            if cache.offset != start:
                raise ValueError(f"attention cache is at position {cache.offset}, call starts at {start}")
            if cache.keys is not None:
                if cache.keys.shape[0] != b:
                    raise ValueError(f"cache was built for batch {cache.keys.shape[0]}, got batch {b}")
                k_start = cache.start_position
                k = mx.concatenate([cache.keys, k], axis=2)
                v = mx.concatenate([cache.values, v], axis=2)
            self.remember(cache, k, v, k_start, start + n)
        elif start != 0:
            raise ValueError("a call that does not start at position 0 needs a cache")

        if n <= self.window:
            out = self._attend_direct(q, k, v, start, k_start)
        else:
            out = self._attend_windows(q, k, v, start, k_start)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, -1)
        out = self.to_out(out)
        if output_gating is not None:
            out = out * output_gating
        return out, orig_v

    def _project(self, x, start, value_residual):
        # queries and keys rotated at their positions (start: an int, or an array in the compiled decode step),
        # values mixed with the first layer's (value residual); and the unmixed values
        if (value_residual is None) != ("to_learned_v_mix" not in self):
            raise ValueError("value_residual must be given exactly to layers after the first")
        xn = self.norm(x)
        q, k, v = mx.split(self.to_qkv(xn), 3, axis=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        orig_v = v
        if value_residual is not None:
            mix = mx.sigmoid(self.to_learned_v_mix(xn)).transpose(0, 2, 1)[..., None]
            v = _lerp(v, value_residual, mix)
        return self.rotary_emb(q, start), self.rotary_emb(k, start), v, orig_v

    def remember(self, cache, k, v, k_start: int, next_start: int) -> None:
        """Keep in `cache` the keys/values (from position k_start on) that queries from next_start on can see."""
        keep = self._first_needed(next_start) - k_start
        cache.keys, cache.values = k[:, :, keep:], v[:, :, keep:]
        cache.start_position, cache.offset = k_start + keep, next_start

    def decode_token(self, x, pos, keys, values, key_pos, value_residual=None, output_gating=None):
        """One token x (b, 1, dim) at position `pos` (an int32 array: nothing recompiles as it grows) against
        cached keys/values (b, h, S, dh) of a fixed length S at key_pos (S,) (-1: an empty slot, never visible).

        Returns (out, unmixed values, the token's rotated key, its mixed value); the caller caches the last two.
        """
        b = x.shape[0]
        q, k, v, orig_v = self._project(x, pos, value_residual)
        all_k, all_v = mx.concatenate([keys, k], axis=2), mx.concatenate([values, v], axis=2)
        k_pos = mx.concatenate([key_pos, pos.reshape(1)])
        all_k, all_v = self._with_persistent(all_k, all_v)
        out = self._sdpa(q, all_k, all_v, self._mask(pos.reshape(1, 1), k_pos[None, :]))
        out = self.to_out(out.transpose(0, 2, 1, 3).reshape(b, 1, -1))
        if output_gating is not None:
            out = out * output_gating
        return out, orig_v, k, v

    @property
    def cached_width(self) -> int:
        # last axis of the cached keys and values (a subclass may cache several per position side by side)
        return self.dim_head

    @property
    def max_cached_keys(self) -> int:
        # the keys a cache holds between calls: the current window, and with sliding attention the previous one
        return self.window * (2 if self.sliding else 1)

    def _first_needed(self, next_start: int) -> int:
        # first key position that queries at positions >= next_start can see
        w = next_start // self.window
        if self.sliding:
            w = max(w - 1, 0)
        return w * self.window

    def _mask(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        W = self.window
        visible = (k_pos >= 0) & (k_pos <= q_pos)
        if self.sliding:
            visible = visible & ((q_pos - k_pos) <= W)
        else:
            visible = visible & ((k_pos // W) == (q_pos // W))
        if self.num_persist:
            shape = visible.shape[:-1] + (self.num_persist,)
            visible = mx.concatenate([mx.ones(shape, dtype=mx.bool_), visible], axis=-1)
        return visible

    def _with_persistent(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if not self.num_persist:
            return k, v
        pk, pv = self.persistent_memory.astype(k.dtype)
        batch = k.shape[0]
        pk = mx.broadcast_to(pk[None], (batch,) + pk.shape)
        pv = mx.broadcast_to(pv[None], (batch,) + pv.shape)
        return mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)

    def _sdpa(self, q, k, v, mask):
        dtype = wide(q.dtype)
        out = mx.fast.scaled_dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), scale=self.scale, mask=mask
        )
        return out.astype(q.dtype)

    def _attend_direct(self, q, k, v, start, k_start):
        # few queries: every query against every cached/new key, masked by global positions
        q_pos = mx.arange(start, start + q.shape[2])[:, None]
        k_pos = mx.arange(k_start, k_start + k.shape[2])[None, :]
        k, v = self._with_persistent(k, v)
        return self._sdpa(q, k, v, self._mask(q_pos, k_pos))

    def _attend_windows(self, q, k, v, start, k_start):
        # many queries: fold into windows of W queries, each against [persistent; (previous window;) window]
        W, b, h, n, dh = self.window, q.shape[0], self.heads, q.shape[2], self.dim_head
        w0, w1 = start // W, (start + n - 1) // W + 1
        nw = w1 - w0
        q = _pad_axis(q, 2, start - w0 * W, w1 * W - start - n).reshape(b, h, nw, W, dh)
        kw0 = w0 - 1 if self.sliding else w0
        k_end = k_start + k.shape[2]
        k = _pad_axis(k, 2, k_start - kw0 * W, w1 * W - k_end)
        v = _pad_axis(v, 2, k_start - kw0 * W, w1 * W - k_end)
        k = k.reshape(b, h, w1 - kw0, W, k.shape[-1])  # cached_width: dh, or several keys per position
        v = v.reshape(b, h, w1 - kw0, W, v.shape[-1])
        q_pos = mx.arange(w0 * W, w1 * W).reshape(nw, W)
        k_pos = mx.arange(kw0 * W, w1 * W).reshape(w1 - kw0, W)
        if self.sliding:
            k = mx.concatenate([k[:, :, :-1], k[:, :, 1:]], axis=3)
            v = mx.concatenate([v[:, :, :-1], v[:, :, 1:]], axis=3)
            k_pos = mx.concatenate([k_pos[:-1], k_pos[1:]], axis=1)
        nk = k.shape[3]
        fold = lambda t: t.transpose(0, 2, 1, 3, 4).reshape(b * nw, h, -1, t.shape[-1])
        q, k, v = fold(q), fold(k), fold(v)
        k, v = self._with_persistent(k, v)
        mask = self._mask(q_pos[:, :, None], k_pos[:, None, :])  # (nw, W, P + nk)
        mask = mx.broadcast_to(mask[None, :, None], (b, nw, 1, W, mask.shape[-1]))
        out = self._sdpa(q, k, v, mask.reshape(b * nw, 1, W, -1))
        out = out.reshape(b, nw, h, W, dh).transpose(0, 2, 1, 3, 4).reshape(b, h, nw * W, dh)
        return out[:, :, start - w0 * W : start - w0 * W + n]
