"""Memory-as-Context transformer (titans-pytorch 0.5.5 ``MemoryAsContextTransformer``) in MLX.

Layout of a sequence of n tokens: after every ``segment_len`` tokens come ``num_longterm_mem_tokens`` learned tokens
(only when more tokens follow), so the model runs on L = ((n - 1) // S) * M + n positions; the long-term tokens are
removed before the final norm. Every layer: [NeuralMemory (store, then retrieve) ->] segmented attention -> SwiGLU
feed-forward, each branch on residual streams (plain residual, or hyper-connections with several streams).

``Model`` reads embed -> layout -> block(x, cache) for each block -> norm -> logits, and is also the model of the
paper's other architectures (titans_mag, titans_mal, titans_lmm, titans_mac with paper_order): ``io.MODEL_TYPES``
gives each model_type its block class, MACLayer here or one of titans_mlx/variants.py.

With a cache (``make_cache``) a sequence can be fed in any pieces; the model inserts the long-term tokens itself when
a piece crosses a segment boundary. Decoding keeps only the attention window(s) and the NeuralMemory state.
Note: titans-pytorch's own cached ``sample(use_cache=True)`` drops the current window in block (non-sliding) mode for
prompts longer than one window; we reproduce its parallel forward (and its uncached ``sample``) instead.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import RMSNorm, SegmentedAttention, wide
from . import decode
from .blocks import AxialPositionalEmbedding, FeedForward, Residuals, build_memory, checkpointed, run_memory
from .cache import make_layer_cache


@dataclass
class ModelArgs:
    num_tokens: int
    dim: int
    depth: int
    segment_len: int
    model_type: str = "titans_mac"
    neural_memory_segment_len: Optional[int] = None
    neural_mem_gate_attn_output: bool = False
    neural_memory_add_value_residual: bool = False  # accepted and unused, as in titans-pytorch
    num_longterm_mem_tokens: int = 0
    num_persist_mem_tokens: int = 0
    neural_memory_batch_size: Optional[int] = None
    neural_memory_qkv_receives_diff_views: bool = False
    dim_head: int = 64
    heads: int = 8
    ff_mult: float = 4
    num_residual_streams: int = 4
    neural_memory_model: Optional[dict] = None
    neural_memory_kwargs: dict = field(default_factory=dict)
    neural_memory_layers: Optional[tuple] = None
    use_flex_attn: bool = False  # CUDA-only in titans-pytorch; the same mask is computed densely here
    sliding_window_attn: bool = False
    neural_mem_weight_residual: bool = False
    legacy_hyper_connections: bool = False  # residual streams of titans-pytorch <= 0.4.x (plain HC, not mHC)
    legacy_hyper_connections_mix_residuals: bool = False  # plain HC of hyper-connections >= 0.3.10 (see hyper_connections)
    # titans-mlx only. False: no axial (absolute) positional embedding, attention keeps its rotary positions. The same
    # text then gets the same memory keys wherever it stands, and prompts longer than training meet no extrapolated
    # segment-index embedding: a titans-pytorch probe recalled passkeys at 4x its training length only this way.
    absolute_positions: bool = True
    # titans-mlx only, titans_mac: the paper's order (v1 eqs. 21-25) instead of titans-pytorch's; see variants.py
    paper_order: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def __post_init__(self):
        for name in ("num_tokens", "dim", "depth", "segment_len", "dim_head", "heads", "num_residual_streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_longterm_mem_tokens", "num_persist_mem_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        from .io import language_model_types

        if self.model_type not in language_model_types():
            raise ValueError(f"model_type must be one of {', '.join(language_model_types())}, got {self.model_type!r}")
        if self.neural_memory_segment_len is None:
            self.neural_memory_segment_len = self.segment_len + self.num_longterm_mem_tokens
        if self.neural_memory_layers is None:
            self.neural_memory_layers = tuple(range(1, self.depth + 1))
        self.neural_memory_layers = tuple(self.neural_memory_layers)
        bad = [i for i in self.neural_memory_layers if not (isinstance(i, int) and 1 <= i <= self.depth)]
        if bad:
            raise ValueError(f"neural_memory_layers must be 1-based layer numbers in 1..{self.depth}, got {bad}")
        reserved = {"dim", "chunk_size", "batch_size", "model", "qkv_receives_diff_views", "accept_weight_residual"}
        if not isinstance(self.neural_memory_kwargs, dict) or reserved & set(self.neural_memory_kwargs):
            raise ValueError(f"neural_memory_kwargs must be a dict without the keys the MAC sets itself "
                             f"({', '.join(sorted(reserved))}), got {self.neural_memory_kwargs!r}")
        if self.neural_memory_model is not None and not isinstance(self.neural_memory_model, dict):
            raise ValueError("neural_memory_model must be a dict like {'class': 'MemoryMLP', 'dim': 64, ...} or None")


class MemoryQKVSelector(nn.Module):
    """Softmax weights choosing the memory's query/key/value inputs among earlier layers' intermediates."""

    def __init__(self, dim: int, num_choices: int):
        super().__init__()
        self.num_choices = num_choices
        self.norm = RMSNorm(dim)
        self.proj = nn.Linear(dim, 3 * num_choices)

    def __call__(self, mem_input: mx.array, choices: list) -> mx.array:
        logits = self.proj(self.norm(mem_input))
        weights = mx.softmax(logits.reshape(*logits.shape[:-1], 3, self.num_choices), axis=-1)  # (b, n, 3, l)
        stacked = mx.stack(choices, axis=-1)  # (b, n, d, l)
        return mx.einsum("bndl,bnvl->vbnd", stacked, weights)


class MACLayer(Residuals, nn.Module):
    compiled_decode = True  # titans_mlx.decode has this layer's single-token step

    def __init__(self, args: ModelArgs, layer: int, has_memory: bool, weight_residual: bool):
        super().__init__()
        self.has_memory = has_memory
        self.gate_attn_output = args.neural_mem_gate_attn_output
        self.collect_views = args.neural_memory_qkv_receives_diff_views
        self.chain_weights = args.neural_mem_weight_residual
        self.attn = SegmentedAttention(
            args.dim, args.segment_len, args.num_persist_mem_tokens, args.num_longterm_mem_tokens,
            args.dim_head, args.heads, args.sliding_window_attn, accept_value_residual=layer > 1,
        )
        self.ff = FeedForward(args.dim, args.ff_mult)
        self.add_hyper_connections(args, "attn_hyper_conn", "ff_hyper_conn")
        if has_memory:
            self.add_hyper_connections(args, "mem_hyper_conn",
                                       add_branch_out_to_residual=not args.neural_mem_gate_attn_output)
        if has_memory:
            if layer > 1 and args.neural_memory_qkv_receives_diff_views:
                self.mem_qkv_selector = MemoryQKVSelector(args.dim, (layer - 1) * 4 + 1)
            self.mem = build_memory(args, weight_residual)

    @staticmethod
    def check_args(args: "ModelArgs") -> None:
        """Every MemoryAsContextTransformer option applies to this layer."""

    def make_cache(self) -> list:
        """This layer's two cache entries (attention window, memory state); see titans_mlx.cache."""
        return make_layer_cache(self.attn.max_cached_keys,
                                len(self.mem.memory_model_parameters) if self.has_memory else 0)

    def wire(self, x, views, memory, attend):
        """The layer's branches on residual streams: memory(qkv) -> what it read; attend(attn_in, gates) ->
        (out, values). Shared by __call__ and the compiled decode step (titans_mlx.decode), which read and attend
        differently. Returns (x, values, views extended by this layer's)."""
        gates = None
        if self.has_memory:
            mem_in, add_mem = self.residual("mem_hyper_conn")(x)
            if "mem_qkv_selector" in self:
                qkv = self.mem_qkv_selector(mem_in, [mem_in, *views])
            else:
                qkv = mx.stack([mem_in, mem_in, mem_in])
            retrieved = memory(qkv)
            if self.gate_attn_output:
                gates = mx.sigmoid(retrieved)
            else:
                x = add_mem(retrieved)
        attn_in, add_attn = self.residual("attn_hyper_conn")(x)
        attn_out, values = attend(attn_in, gates)
        x = add_attn(attn_out)
        ff_in, add_ff = self.residual("ff_hyper_conn")(x)
        ff_out = self.ff(ff_in)
        x = add_ff(ff_out)
        if self.collect_views:
            views = [*views, attn_in, attn_out, ff_in, ff_out]
        return x, values, views

    def __call__(self, x, start: int, cache=None, value_residual=None, prev_weights=None, views: list = (),
                 return_memory: bool = False):
        """One layer on x (b, L, d) or streams (b, L, s, d) at positions start..start+L-1.

        cache: this layer's [attention ChunkedKVCache, memory ArraysCache] (see titans_mlx.cache), or None.
        value_residual: the first layer's attention values (None in the first layer); prev_weights: the previous
        memory layer's weights per chunk (weight residual); views: every earlier layer's attn in/out and ff in/out
        (qkv views). Returns (x, this layer's attention values, this memory's weights per chunk or prev_weights,
        views extended by this layer's). Arguments are arrays or lists of them, so mx.checkpoint can wrap a layer.
        return_memory: also return what the memory wrote and read (see Model.__call__), None without memory.
        """
        record = None

        def memory(qkv):
            nonlocal prev_weights, record
            retrieved, prev_weights, record = run_memory(self.mem, qkv, cache[1] if cache is not None else None, start,
                                                         prev_weights, self.chain_weights, return_memory)
            return retrieved

        def attend(attn_in, gates):
            return self.attn(attn_in, start, value_residual, cache[0] if cache is not None else None, gates)

        x, values, views = self.wire(x, views, memory, attend)
        if return_memory:
            return x, values, prev_weights, views, record
        return x, values, prev_weights, views


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.segment_len = S = args.segment_len
        self.num_longterm = M = args.num_longterm_mem_tokens
        self.window = S + M
        self.token_emb = nn.Embedding(args.num_tokens, args.dim)
        if args.absolute_positions:
            self.axial_pos_emb = AxialPositionalEmbedding(args.dim, args.neural_memory_segment_len)
        else:
            self.axial_pos_emb = None
        self.longterm_mems = mx.random.normal((M, args.dim)) * 0.02
        if args.num_residual_streams > 1:
            self.stream_embed = mx.zeros((args.num_residual_streams, args.dim))
        from .io import block_class  # the block of each model type is registered with it, in io.MODEL_TYPES

        block = block_class(args)
        block.check_args(args)
        memory_layers = set(args.neural_memory_layers)
        first_memory = min(memory_layers, default=None)
        self.layers = [
            block(args, i, i in memory_layers, args.neural_mem_weight_residual and i != first_memory)
            for i in range(1, args.depth + 1)
        ]
        self.norm = RMSNorm(args.dim)
        self.to_logits = nn.Linear(args.dim, args.num_tokens, bias=False)
        # a setting, not state: recompute each layer in the backward pass instead of keeping its activations
        self.checkpoint_layers = False
        # a setting: single decoded tokens take the compiled step (titans_mlx.decode); False: the general path
        self.compile_decode = True

    # ---- positions -------------------------------------------------------------------------------------------------

    def positions_for(self, num_tokens: int) -> int:
        """Number of positions (tokens + interleaved long-term tokens) the model runs on for num_tokens tokens."""
        return 0 if num_tokens == 0 else ((num_tokens - 1) // self.segment_len) * self.num_longterm + num_tokens

    def _layout(self, start: int, stop: int, n: int):
        # for positions start..stop-1: index into [n tokens of this call; long-term tokens], and where the tokens are
        pos = np.arange(start, stop)
        in_window = pos % self.window
        is_mem = in_window >= self.segment_len
        index = np.where(is_mem, n + in_window - self.segment_len, np.cumsum(~is_mem) - 1)
        return index, np.nonzero(~is_mem)[0]

    # ---- forward ---------------------------------------------------------------------------------------------------

    def make_cache(self) -> list:
        """An empty cache: two mlx-lm cache entries per layer (attention window, memory state); see titans_mlx.cache."""
        return [entry for layer in self.layers for entry in layer.make_cache()]

    def __call__(self, inputs: mx.array, cache: Optional[list] = None, return_memory: bool = False):
        """Token ids (b, n) -> logits (b, n, num_tokens); with a cache from make_cache(), continues the sequence.

        return_memory: return (logits, records) instead, one record per layer (None without memory): a dict of
        the NeuralMemory's ``surprises`` and ``step_sizes`` (its return_surprises output: per stored key and head,
        (b, heads, keys) for the chunks this call completed), the per-chunk ``forget``, ``update_norm`` and
        ``weight_norm`` (b, heads, chunks) and ``first_chunk`` (NeuralMemory's return_stats), and ``retrieved``
        (b, positions, dim), what the memory read. Positions count the long-term memory tokens (see _layout).
        Opt-in and explicit: nothing is kept on the modules; the caller evaluates.
        """
        if not isinstance(inputs, mx.array):
            inputs = mx.array(np.asarray(inputs))
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be token ids of shape (batch, n), got shape {tuple(inputs.shape)}")
        if cache is not None and len(cache) != 2 * len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries, the model needs {2 * len(self.layers)} (two per layer); "
                             "use model.make_cache()")
        b, n = inputs.shape
        plan = None  # the compiled decode step's plan, when this call may take it
        if cache is not None and not return_memory and self.compile_decode:
            plan = decode.eligible(self, cache, inputs)
        if plan is not None:
            return decode.step(self, inputs, cache, plan)
        start = cache[0].offset if cache is not None else 0
        seen = self._tokens_before(start)
        stop = self.positions_for(seen + n)
        if n == 0:
            empty = mx.zeros((b, 0, self.args.num_tokens), self.norm.weight.dtype)  # norm: never quantized
            return (empty, [None] * len(self.layers)) if return_memory else empty

        index, token_positions = self._layout(start, stop, n)
        x = self._embed(inputs, index, start, stop)
        x, records = self._blocks(x, start, cache, return_memory)
        x = self._unembed(x, token_positions)
        logits = self.to_logits(self.norm(x))
        return (logits, records) if return_memory else logits

    def _embed(self, inputs, index, start: int, stop: int) -> mx.array:
        # token embeddings laid out with the long-term tokens at positions start..stop-1, plus positions, as streams
        b = inputs.shape[0]
        tokens = self.token_emb(inputs)
        if self.num_longterm:
            mems = mx.broadcast_to(self.longterm_mems[None].astype(tokens.dtype), (b, self.num_longterm, tokens.shape[-1]))
            tokens = mx.concatenate([tokens, mems], axis=1)
        x = tokens[:, mx.array(index)]
        if self.axial_pos_emb is not None:
            x = x + self.axial_pos_emb(start, stop, x.dtype)
        if self.args.num_residual_streams > 1:
            x = x[:, :, None, :] + self.stream_embed.astype(x.dtype)
        return x

    def _blocks(self, x, start: int, cache, return_memory: bool):
        # every block on x; what a block hands the next (the first attention's values for the value residual, the
        # memory's weights per chunk for the weight residual, the qkv views) passes along here
        value_residual, prev_weights, views, records = None, None, [], []
        for i, layer in enumerate(self.layers):
            layer_cache = cache[2 * i:2 * i + 2] if cache is not None else None
            if return_memory:
                x, values, prev_weights, views, record = layer(x, start, layer_cache, value_residual, prev_weights,
                                                               views, return_memory=True)
                records.append(record)
            else:
                run = layer
                if self.checkpoint_layers and cache is None:
                    run = checkpointed(layer)
                x, values, prev_weights, views = run(x, start, layer_cache, value_residual, prev_weights, views)
            value_residual = values if value_residual is None else value_residual
        return x, records

    def _unembed(self, x, token_positions) -> mx.array:
        # streams summed, long-term tokens dropped: one vector per token of the call
        if self.args.num_residual_streams > 1:
            x = x.sum(axis=2)
        if self.num_longterm:
            x = x[:, mx.array(token_positions)]
        return x

    def loss(self, ids: mx.array, weights: Optional[mx.array] = None) -> mx.array:
        """Mean next-token cross-entropy of ids (b, n), as titans-pytorch's forward(ids, return_loss=True).

        weights (b, n - 1), one per target: the weighted mean instead (sum of w * loss over sum of w), so a sample
        can be trained on its answer only (weight 0 elsewhere) or mostly (a small weight elsewhere).
        """
        logits = self(ids[:, :-1])
        losses = nn.losses.cross_entropy(logits.astype(wide(logits.dtype)), ids[:, 1:], reduction="none")
        if weights is None:
            return losses.mean()
        weights = weights.astype(losses.dtype)
        return (losses * weights).sum() / weights.sum()

    def _tokens_before(self, position: int) -> int:
        # positions already processed always end on a token, never inside a run of long-term tokens
        full, rest = divmod(position, self.window)
        return full * self.segment_len + min(rest, self.segment_len)

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    _SLOTS = {"0": "mem_hyper_conn", "1": "attn_hyper_conn", "2": "ff_hyper_conn", "3": "mem_qkv_selector",
              "4": "mem", "5": "attn", "6": "ff"}
    _SUBLAYERS = {"ff": {"0": "norm", "1": "proj_in", "3": "proj_out"}, "mem_qkv_selector": {"0": "norm", "1": "proj"},
                  "attn": {"to_learned_v_mix.0": "to_learned_v_mix"}}

    @staticmethod
    def cast_predicate(key: str) -> bool:
        """Whether a dtype conversion may cast this weight (NeuralMemory keeps its initial fast weights float32)."""
        from .memory import NeuralMemory

        return NeuralMemory.cast_predicate(key)

    @staticmethod
    def quant_predicate(path: str, module: nn.Module):
        """How mlx-lm's ``quantize_model`` (``convert -q``) may quantize a layer: True (the requested bits), a dict of
        settings, or False (unquantized). The axial positional MLPs stay unquantized (fed raw positions, up to the
        thousands, where a weight's rounding error grows with the input); each NeuralMemory decides for its own layers;
        the value-residual mix and the qkv-view selector, small mixing weights, go to 8 bits."""
        from .memory import NeuralMemory, eight_bits

        if not hasattr(module, "to_quantized") or path.startswith("axial_pos_emb."):
            return False
        if ".mem." in path:
            return NeuralMemory.quant_predicate(path.split(".mem.", 1)[1], module)
        if path.endswith((".attn.to_learned_v_mix", ".mem_qkv_selector.proj")):
            return eight_bits(module)
        return True

    def sanitize(self, weights: dict) -> dict:
        """titans-pytorch ``MemoryAsContextTransformer`` state-dict names -> ours (idempotent)."""
        out, memories = {}, {}
        if self.args.num_residual_streams > 1:
            from .hyper_connections import HyperConnection

            legacy = HyperConnection.is_legacy_state_dict(weights.keys())
            has_hc = any(k.endswith("static_alpha") for k in weights)
            if has_hc and legacy != self.args.legacy_hyper_connections:
                raise ValueError(f"checkpoint has {'legacy' if legacy else 'mHC'} hyper-connections, config says "
                                 f"legacy_hyper_connections={self.args.legacy_hyper_connections}")
        for key, value in weights.items():
            if not isinstance(value, mx.array):
                value = mx.array(np.asarray(value))
            if key == "zero" or key.endswith((".cached_freqs", ".dummy")) or key == "axial_pos_emb.dummy":
                continue
            key = key.replace("expand_streams.stream_embed", "stream_embed")
            key = re.sub(r"^axial_pos_emb\.mlps\.(\d+)\.(\d+)\.", r"axial_pos_emb.mlps.\1.layers.\2.", key)
            m = re.match(r"^layers\.(\d+)\.(\d+)\.(.*)$", key)
            if m:
                key = f"layers.{m[1]}.{self._SLOTS[m[2]]}.{m[3]}"
            m = re.match(r"^layers\.(\d+)\.(\w+)\.(.*)$", key)
            if m and m[2] == "mem":
                memories.setdefault(m[1], {})[m[3]] = value
                continue
            if m and m[2] in self._SUBLAYERS:
                rest = m[3]
                for old, new in self._SUBLAYERS[m[2]].items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                key = f"layers.{m[1]}.{m[2]}.{rest}"
            out[key] = value
        for i, sub in memories.items():
            layer = self.layers[int(i)]
            if not layer.has_memory:
                raise ValueError(f"checkpoint has NeuralMemory weights for layer {int(i) + 1}, "
                                 f"which is not in neural_memory_layers {self.args.neural_memory_layers}")
            for k, v in layer.mem.sanitize(sub).items():
                out[f"layers.{i}.mem.{k}"] = v
        return out
