"""Pieces every block of a Titans language model is made of (the MAC in mac.py, MAG/MAL/LMM and the paper-order MAC in
variants.py): the feed-forward, the axial positional embedding, residual streams, and the NeuralMemory a block owns,
built from the model's config and run against the block's cache entry."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import RMSNorm
from .cache import read_memory_state, write_memory_state


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float = 4):
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        self.norm = RMSNorm(dim)
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj_in(self.norm(x)), 2, axis=-1)
        return self.proj_out(nn.silu(gate) * value)


class AxialPositionalEmbedding(nn.Module):
    """pos(t) = mlps[0](t // P) + mlps[1](t % P), each MLP fed the raw integer as a float."""

    def __init__(self, dim: int, period: int):
        super().__init__()
        self.period = period
        hidden = 2 * dim
        self.mlps = [
            nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))
            for _ in range(2)
        ]

    def __call__(self, start: int, stop: int, dtype) -> mx.array:
        P = self.period
        lo, hi = start // P, (stop - 1) // P + 1
        outer = self.mlps[0](mx.arange(lo, hi, dtype=dtype)[:, None])
        inner = self.mlps[1](mx.arange(P, dtype=dtype)[:, None])
        pos = mx.arange(start, stop)
        return outer[pos // P - lo] + inner[pos % P]

    def at(self, pos: mx.array, dtype) -> mx.array:
        """The embedding (1, dim) of one position given as an int array (the compiled decode step)."""
        column = lambda t: t.astype(dtype).reshape(1, 1)
        return self.mlps[0](column(pos // self.period)) + self.mlps[1](column(pos % self.period))


class PlainResidual:
    """One residual stream: branch sees x, output is x + branch_out."""

    def __call__(self, x):
        return x, lambda out: out + x


class Residuals:
    """Mixin: ``self.residual(name)`` is the block's hyper-connection of that name, or a plain residual."""

    def residual(self, name):
        return self[name] if name in self else PlainResidual()

    def add_hyper_connections(self, args, *names, **kwargs):
        # one residual-stream mixer per branch when the model has several streams (mHC, or the legacy HC)
        if args.num_residual_streams == 1:
            return
        from .hyper_connections import HyperConnection

        for name in names:
            self[name] = HyperConnection(args.dim, args.num_residual_streams, legacy=args.legacy_hyper_connections,
                                         legacy_mix_residuals=args.legacy_hyper_connections_mix_residuals, **kwargs)


def build_memory(args, weight_residual: bool):
    """The NeuralMemory of a block, from the model's neural_memory_* settings (every NeuralMemory option goes through
    neural_memory_kwargs). It takes (queries, keys, values) views: the MAC may give it different ones."""
    from .memory import NeuralMemory

    model = None
    if args.neural_memory_model is not None:
        from .memory_models import build_memory_model

        model = build_memory_model(dict(args.neural_memory_model))
    try:
        return NeuralMemory(
            dim=args.dim, chunk_size=args.neural_memory_segment_len, batch_size=args.neural_memory_batch_size,
            model=model, qkv_receives_diff_views=True, accept_weight_residual=weight_residual,
            **args.neural_memory_kwargs,
        )
    except TypeError as e:
        raise ValueError(f"neural_memory_kwargs: {e}") from None


def same_views(x: mx.array) -> mx.array:
    """x as the memory's (queries, keys, values) views: the same tokens for all three."""
    return mx.stack([x, x, x])


def run_memory(mem, qkv, entry, start: int, prev_weights=None, chain_weights: bool = False,
               return_memory: bool = False):
    """Write and read ``qkv`` with the memory whose state is in the cache entry (an ArraysCache, or None for a
    one-call forward), at positions start.. . Returns (what it read, the weights per chunk for the next memory layer
    or prev_weights, a record of what it wrote and read with return_memory else None)."""
    state = read_memory_state(entry, start) if entry is not None else None
    extra = dict(return_surprises=True, return_stats=True) if return_memory else {}
    record = None
    if chain_weights:  # the next memory layer mixes these weights into its own (weight residual)
        retrieved, state, *more = mem(qkv, state, prev_weights, return_updates=True, **extra)
        prev_weights = more.pop(1 if return_memory else 0)
    else:
        retrieved, state, *more = mem(qkv, state, **extra)
    if return_memory:  # more: (losses, step sizes) of return_surprises, the dict of return_stats
        (surprises, step_sizes), stats = more
        record = dict(stats, surprises=surprises, step_sizes=step_sizes, retrieved=retrieved)
    if entry is not None:
        write_memory_state(entry, state)
    return retrieved, prev_weights, record


def checkpointed(layer: nn.Module):
    """layer, recomputed in the backward pass (mx.checkpoint); its parameters go in explicitly so they get gradients."""

    def run(params, *args):
        layer.update(params)
        return layer(*args)

    return lambda *args: mx.checkpoint(run)(layer.trainable_parameters(), *args)
