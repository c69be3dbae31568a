"""The Titans paper's ways of putting the long-term memory in a model (v1 section 4), as blocks of
``titans_mlx.mac.Model``, which reads embed -> layout -> block(x, cache) for each block -> norm -> logits.

- ``MAGBlock`` (titans_mag, eqs. 26-28): memory as a gate beside sliding-window attention,
  ``o = norm(SWA([p] || x)) * sigmoid(norm(M(x)))``, then the feed-forward.
- ``MALBlock`` (titans_mal, eqs. 29-31): memory as a layer before sliding-window attention,
  ``x += M(x); x += SWA([p] || x)``, then the feed-forward.
- ``LMMBlock`` (titans_lmm): the memory alone as the token mixer, ``x += M(x)``, then the feed-forward.
- ``PaperMACLayer`` (titans_mac with ``paper_order: true``, eqs. 21-25): per segment, read the memory with the
  segment's queries (h = M*_{t-1}(q)), attend over [persistent || h || segment], write the attention output y into the
  memory, read it again with y and gate: ``o = y * sigmoid(M*_t(y))``.

M is our NeuralMemory with every option (titans-pytorch's semantics: a token reads the memory as it stands after
every complete chunk ending at or before it, so a block is causal even inside a chunk). Each block is a residual
branch per arrow above (plain residuals, or hyper-connections with several residual streams). Persistent tokens
[p] are learned keys/values every query of the attention sees (SegmentedAttention), as in titans-pytorch; the memory
reads the text only. MAG and MAL attend over a sliding window of ``segment_len`` tokens (the query at position i sees
i - segment_len .. i, and the persistent tokens), whatever ``sliding_window_attn`` says: that is their definition.
Where the paper is silent on a detail, the choice is the MAC's (pre-norms, SwiGLU feed-forward, rotary positions,
optional axial positions); the README maps each block to the equations.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ChunkedKVCache

from .attention import RMSNorm, SegmentedAttention, wide
from .blocks import FeedForward, Residuals, build_memory, run_memory, same_views
from .cache import make_layer_cache, read_memory_state, read_segment_start, write_memory_state


class _Block(Residuals, nn.Module):
    """What the variants share: the feed-forward after the mixing branches, their cache, what they hand the next block
    (no attention values: no value residual; the memory's weights per chunk with the weight residual)."""

    def __init__(self, args, has_memory: bool, weight_residual: bool):
        super().__init__()
        self.has_memory = has_memory
        self.chain_weights = args.neural_mem_weight_residual
        if has_memory:
            self.mem = build_memory(args, weight_residual)
        self.ff = FeedForward(args.dim, args.ff_mult)

    @classmethod
    def check_args(cls, args) -> None:
        """ValueError for the MAC-only options, which these blocks do not have."""
        name = args.model_type
        if args.paper_order:
            raise ValueError(f"paper_order is an option of titans_mac, not of {name}")
        if args.num_longterm_mem_tokens:
            raise ValueError(f"{name} has no long-term memory tokens (the MAC's): num_longterm_mem_tokens must be 0, "
                             f"got {args.num_longterm_mem_tokens}")
        for option in ("neural_memory_qkv_receives_diff_views", "neural_mem_gate_attn_output"):
            if getattr(args, option):
                raise ValueError(f"{option} is an option of titans_mac, not of {name}")

    def make_cache(self) -> list:
        attn = self.get("attn")
        return make_layer_cache(attn.max_cached_keys if attn is not None else 0,
                                len(self.mem.memory_model_parameters) if self.has_memory else 0)

    def _memory(self, x, start, cache, prev_weights, return_memory):
        # the memory branch on its input x: (what it read, weights for the next memory layer, record)
        return run_memory(self.mem, same_views(x), cache[1] if cache is not None else None, start, prev_weights,
                          self.chain_weights, return_memory)

    def _attention(self, x, start, cache):
        out, _ = self.attn(x, start, None, cache[0] if cache is not None else None)
        return out

    def _feed_forward(self, x):
        ff_in, add_ff = self.residual("ff_hyper_conn")(x)
        return add_ff(self.ff(ff_in))

    @staticmethod
    def _result(x, prev_weights, views, record, return_memory):
        # the block interface of MACLayer.__call__: (x, attention values for the value residual, weights, views)
        return (x, None, prev_weights, views, record) if return_memory else (x, None, prev_weights, views)


def _sliding_attention(args) -> SegmentedAttention:
    # the SWA of MAG and MAL: a window of segment_len tokens with the persistent tokens in front of every query
    return SegmentedAttention(args.dim, args.segment_len, args.num_persist_mem_tokens, 0, args.dim_head, args.heads,
                              sliding=True)


class MAGBlock(_Block):
    """Memory as a gate (eqs. 26-28): y = SWA([p] || x), m = M(x), o = RMSNorm(y) * sigmoid(RMSNorm(m)); x += o.
    The two norms are the paper's "normalised with learnable vectors" before the non-linear gate. A layer not in
    neural_memory_layers is a plain SWA layer."""

    def __init__(self, args, layer: int, has_memory: bool, weight_residual: bool):
        super().__init__(args, has_memory, weight_residual)
        self.attn = _sliding_attention(args)
        if has_memory:
            self.attn_out_norm, self.mem_out_norm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.add_hyper_connections(args, "mix_hyper_conn", "ff_hyper_conn")

    def __call__(self, x, start: int, cache=None, value_residual=None, prev_weights=None, views: list = (),
                 return_memory: bool = False):
        mix_in, add_mix = self.residual("mix_hyper_conn")(x)
        out, record = self._attention(mix_in, start, cache), None
        if self.has_memory:  # both branches read the same input, side by side
            read, prev_weights, record = self._memory(mix_in, start, cache, prev_weights, return_memory)
            out = self.attn_out_norm(out) * mx.sigmoid(self.mem_out_norm(read))
        x = self._feed_forward(add_mix(out))
        return self._result(x, prev_weights, views, record, return_memory)


class MALBlock(_Block):
    """Memory as a layer (eqs. 29-31): x += M(x), then x += SWA([p] || x), then the feed-forward."""

    def __init__(self, args, layer: int, has_memory: bool, weight_residual: bool):
        super().__init__(args, has_memory, weight_residual)
        self.attn = _sliding_attention(args)
        self.add_hyper_connections(args, *(("mem_hyper_conn",) if has_memory else ()), "attn_hyper_conn",
                                   "ff_hyper_conn")

    def __call__(self, x, start: int, cache=None, value_residual=None, prev_weights=None, views: list = (),
                 return_memory: bool = False):
        record = None
        if self.has_memory:
            mem_in, add_mem = self.residual("mem_hyper_conn")(x)
            read, prev_weights, record = self._memory(mem_in, start, cache, prev_weights, return_memory)
            x = add_mem(read)
        attn_in, add_attn = self.residual("attn_hyper_conn")(x)
        x = self._feed_forward(add_attn(self._attention(attn_in, start, cache)))
        return self._result(x, prev_weights, views, record, return_memory)


class LMMBlock(_Block):
    """The memory alone (the paper's "Titans (LMM)"): x += M(x), then the feed-forward; no attention."""

    def __init__(self, args, layer: int, has_memory: bool, weight_residual: bool):
        super().__init__(args, has_memory, weight_residual)
        self.add_hyper_connections(args, "mem_hyper_conn", "ff_hyper_conn")

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if len(set(args.neural_memory_layers)) != args.depth:
            raise ValueError(f"titans_lmm mixes tokens with its memory only: every layer needs one, "
                             f"neural_memory_layers is {list(args.neural_memory_layers)} for depth {args.depth}")
        if args.num_persist_mem_tokens:
            raise ValueError(f"titans_lmm has no attention to hold persistent tokens: num_persist_mem_tokens must be "
                             f"0, got {args.num_persist_mem_tokens}")

    def __call__(self, x, start: int, cache=None, value_residual=None, prev_weights=None, views: list = (),
                 return_memory: bool = False):
        mem_in, add_mem = self.residual("mem_hyper_conn")(x)
        read, prev_weights, record = self._memory(mem_in, start, cache, prev_weights, return_memory)
        x = self._feed_forward(add_mem(read))
        if cache is not None:  # no attention keys to keep; the entry still tells the model where the sequence is
            cache[0].offset = start + x.shape[1]
        return self._result(x, prev_weights, views, record, return_memory)


class MemoryContextAttention(SegmentedAttention):
    """Attention over [persistent || retrieved || segment] (eqs. 22-23), causal: the query at position i sees the
    persistent tokens and, at every position j it may see (j <= i in its window), both the token x_j and h_j, what
    the memory returned for x_j's query. h_j depends on x_j and earlier segments only, so nothing after i leaks in
    (the paper's Fig. 3a lets every query see all of h, which would read later tokens' queries). h_j's key and value
    sit beside x_j's in the cache (cached_width = 2 * dim_head) and are rotated at j's position."""

    @property
    def cached_width(self) -> int:
        return 2 * self.dim_head

    def attend(self, x, retrieved, start: int, cache) -> mx.array:
        out, _ = super().__call__(mx.concatenate([x, retrieved], axis=-1), start, None, cache)
        return out

    def _project(self, xh, start, value_residual):
        x, h = mx.split(xh, 2, axis=-1)
        q, kx, vx = (self._split_heads(t) for t in mx.split(self.to_qkv(self.norm(x)), 3, axis=-1))
        _, kh, vh = (self._split_heads(t) for t in mx.split(self.to_qkv(self.norm(h)), 3, axis=-1))
        k = mx.concatenate([self.rotary_emb(kx, start), self.rotary_emb(kh, start)], axis=-1)
        v = mx.concatenate([vx, vh], axis=-1)
        return self.rotary_emb(q, start), k, v, v

    def _with_persistent(self, k, v):
        # (…, n, 2 dh) side by side -> (…, 2n, dh): x_0, h_0, x_1, h_1, ...
        unstack = lambda t: t.reshape(*t.shape[:-2], 2 * t.shape[-2], t.shape[-1] // 2)
        return super()._with_persistent(unstack(k), unstack(v))

    def _mask(self, q_pos, k_pos):
        visible = super()._mask(q_pos, k_pos)  # [persistent; one column per position]
        P = self.num_persist
        return mx.concatenate([visible[..., :P], mx.repeat(visible[..., P:], 2, axis=-1)], axis=-1)


class PaperMACLayer(Residuals, nn.Module):
    """Memory as context in the paper's order (v1 eqs. 21-25), one segment (window of segment_len tokens plus any
    long-term tokens) after another, since each segment's first read needs the memory the previous one wrote:

        h = M*_{t-1}(q)                 the memory as the segment found it, read with the segment's queries
        y = Attn([p] || h || S)         MemoryContextAttention (causal, see there)
        M_t = M_{t-1}(y)                write the attention output (chunk by chunk, as NeuralMemory writes)
        o = y * sigmoid(M*_t(y))        read again with y (each token after the chunks ending at or before it); x += o

    then the feed-forward. A layer not in neural_memory_layers attends over [p] || S alone. The cache keeps, beside
    the memory's state, its weights at the current segment's start (a call may end mid-segment)."""

    def __init__(self, args, layer: int, has_memory: bool, weight_residual: bool):
        super().__init__()
        self.has_memory = has_memory
        kind = MemoryContextAttention if has_memory else SegmentedAttention
        self.attn = kind(args.dim, args.segment_len, args.num_persist_mem_tokens, args.num_longterm_mem_tokens,
                         args.dim_head, args.heads, args.sliding_window_attn)
        if has_memory:
            self.mem = build_memory(args, weight_residual)
            if not self.mem.memory_model.tokenwise:
                raise ValueError(f"paper_order reads the memory token by token; neural_memory_model "
                                 f"{args.neural_memory_model!r} reads across tokens")
        self.ff = FeedForward(args.dim, args.ff_mult)
        self.add_hyper_connections(args, "attn_hyper_conn", "ff_hyper_conn")

    @classmethod
    def check_args(cls, args) -> None:
        for option in ("neural_memory_qkv_receives_diff_views", "neural_mem_gate_attn_output",
                       "neural_mem_weight_residual"):
            if getattr(args, option):
                raise ValueError(f"{option} is an option of titans-pytorch's MAC order, not of paper_order")

    def make_cache(self) -> list:
        return make_layer_cache(self.attn.max_cached_keys,
                                len(self.mem.memory_model_parameters) if self.has_memory else 0,
                                segment_start=self.has_memory)

    def __call__(self, x, start: int, cache=None, value_residual=None, prev_weights=None, views: list = (),
                 return_memory: bool = False):
        if return_memory:
            raise ValueError("return_memory (python -m titans_mlx.inspect) does not cover the paper-order MAC")
        branch_in, add = self.residual("attn_hyper_conn")(x)
        if self.has_memory:
            out = self._memory_as_context(branch_in, start, cache)
        else:
            out, _ = self.attn(branch_in, start, None, cache[0] if cache is not None else None)
        x = add(out)
        ff_in, add_ff = self.residual("ff_hyper_conn")(x)
        return add_ff(self.ff(ff_in)), None, prev_weights, views

    def _memory_as_context(self, x, start: int, cache):
        b, n = x.shape[:2]
        W = self.attn.window
        # a one-call forward runs segment by segment too, so its attention needs a cache of its own
        attn_cache = cache[0] if cache is not None else ChunkedKVCache(self.attn.max_cached_keys)
        entry = cache[1] if cache is not None else None
        state = read_memory_state(entry, start) if entry is not None else None
        state = state or self.mem.initial_state(b, wide(x.dtype))
        segment_weights = read_segment_start(entry, state.last_update) if start % W else None
        if start % W and segment_weights is None:
            raise ValueError(f"the cache lacks the memory's weights at the segment's start (position {start}); "
                             "use model.make_cache()")
        outs, p0 = [], start
        while p0 < start + n:
            p1 = min((p0 // W + 1) * W, start + n)
            if p0 % W == 0:  # a new segment: the memory as the previous segments left it
                segment_weights = state.last_update
            piece = x[:, p0 - start:p1 - start]
            retrieved, _ = self.mem.read_current(same_views(piece), segment_weights)  # eq. 21
            y = self.attn.attend(piece, retrieved, p0, attn_cache)  # eqs. 22-23
            read, state = self.mem(same_views(y), state)  # eq. 24, then eq. 25's M*_t(y)
            outs.append(y * mx.sigmoid(read))  # eq. 25
            p0 = p1
        if entry is not None:
            write_memory_state(entry, state, segment_weights)
        return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
