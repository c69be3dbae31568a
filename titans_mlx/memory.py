"""NeuralMemory: Titans' neural long-term memory, exact to titans-pytorch 0.5.5's parallel forward.

A token t reads the memory as it stands after every complete chunk ending at or before t (its own chunk when t is
the chunk's last token), which is what titans-pytorch's one-call forward computes. Calls carrying ``state`` may split
a sequence anywhere — mid-chunk, single tokens, empty calls — and give the one-call output. (titans-pytorch's own
chaining is exact only for chunk-aligned calls or single tokens; we follow its parallel forward.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx.utils import tree_map

from .attention import wide
from .memory_models import MemoryMLP, MemoryModel, ResidualNorm, build_memory_model
from . import memory_step
from .memory_step import ACTIVATIONS, Structure, retrieve, store_block

# a processing block holds at most this many bytes of per-chunk memory weights (gradients and updates each)
BLOCK_BYTES = 64 * 2**20
MAX_BLOCK_CHUNKS = 64


@dataclass
class MemoryState:
    """What carries between calls: plain arrays and one int (a model's cache keeps it in an mlx-lm ArraysCache, see
    titans_mlx.cache).

    seq_index: tokens already stored as complete chunks; grad_point: the weights gradients are taken at (the
    learned initial weights, or the latest weights at the last TTT mini-batch boundary); last_update: the current
    memory weights; momentum: (order, BH, *shape) per parameter, or None; buffer: raw store-view tokens of the
    incomplete chunk, (b, r, dim) or (2, b, r, dim) with qkv views; read_context: for memory models that look across
    tokens (attention), the raw query-view tokens of the current read window so far (a zero token stands for the
    padding before position 0), else None.
    """

    seq_index: int
    grad_point: list
    last_update: list
    momentum: Optional[list]
    buffer: mx.array
    read_context: Optional[mx.array] = None

    def detach(self) -> "MemoryState":
        sg = lambda xs: None if xs is None else [mx.stop_gradient(x) for x in xs]
        return replace(self, grad_point=sg(self.grad_point), last_update=sg(self.last_update),
                       momentum=sg(self.momentum), buffer=mx.stop_gradient(self.buffer),
                       read_context=None if self.read_context is None else mx.stop_gradient(self.read_context))


class _RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = mx.ones((dim,))


class _Gamma(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.gamma = mx.zeros(shape)


class _AttentionPool(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_attn_logits = nn.Linear(dim, dim)
        self.to_attn_logits.weight = mx.zeros((dim, dim))
        self.to_attn_logits.bias = mx.zeros((dim,))


# projections whose few outputs (one per head) set how the memory writes: step size, decay, momentum and its mixing,
# per-layer learning rates, weight-residual mix, the heads' read gate. They stay unquantized (a few KB): an error in
# them changes every write, and the memory carries it through the rest of the document.
GATES = ("to_adaptive_step", "to_decay_factor", "to_momentum", "to_learned_momentum_combine", "to_layer_modulation",
         "to_learned_weight_residual_mix", "retrieve_gate")


def eight_bits(module: nn.Module):
    """Quantization settings for a layer that must stay precise: 8 bits (as mlx-lm keeps MoE routers), in groups of
    64 or 32 inputs; False (unquantized) when neither divides its input width."""
    width = module.weight.shape[-1]
    for group_size in (64, 32):
        if width % group_size == 0:
            return {"group_size": group_size, "bits": 8}
    return False


_COMPILED: dict = {}
TRACE_COUNT = {"store_block": 0}  # incremented each time the compiled step is traced (tests check reuse)


def _traced_store_block(*args, **kwargs):
    TRACE_COUNT["store_block"] += 1
    return store_block(*args, **kwargs)


def _compiled_store_block(structure: Structure, want_updates: bool, want_stats: bool = False, use_kernel: bool = True):
    # the statistics are a separate compiled function, so the everyday step computes nothing extra; what the form
    # of the recurrences depends on is part of the key (memory_step.choose_form), so switching
    # memory_step.DUAL_FORM or registering a kernel takes effect
    key = (structure, want_updates, use_kernel, memory_step.forms_key()) + ((True,) if want_stats else ())
    if key not in _COMPILED:
        kwargs = {"want_stats": True} if want_stats else {}
        _COMPILED[key] = mx.compile(partial(_traced_store_block, structure, want_updates, use_kernel=use_kernel,
                                            **kwargs))
    return _COMPILED[key]


class NeuralMemory(nn.Module):
    """Titans' neural memory; constructor keywords and defaults are titans-pytorch 0.5.5's ``NeuralMemory``."""

    def __init__(
        self,
        dim: int,
        chunk_size: int | tuple = 1,
        batch_size: Optional[int] = None,
        dim_head: Optional[int] = None,
        heads: int = 1,
        model: Optional[MemoryModel | dict] = None,
        store_memory_loss_fn: Optional[Callable] = None,
        adaptive_step_transform: Optional[Callable] = None,
        default_step_transform_max_lr: float = 1.0,
        per_parameter_lr_modulation: bool = False,
        max_mem_layer_modulation: float = 1.0,
        per_head_learned_parameters: bool = True,
        attn_pool_chunks: bool = False,
        momentum: bool = True,
        momentum_order: int = 1,
        learned_momentum_combine: bool = False,
        learned_combine_include_zeroth: bool = False,
        num_kv_per_token: int = 1,
        qkv_receives_diff_views: bool = False,
        pre_rmsnorm: bool = True,
        post_rmsnorm: bool = False,
        qk_rmsnorm: bool = False,
        max_grad_norm: Optional[float] = None,
        use_accelerated_scan: bool = False,  # a CUDA scan in titans-pytorch; numerically the same recurrence
        activation: Optional[str | Callable] = None,
        init_adaptive_step_bias: Optional[float] = None,
        init_momentum_bias: Optional[float] = None,
        init_decay_bias: Optional[float] = None,
        accept_weight_residual: bool = False,
        spectral_norm_surprises: bool = False,
        gated_transition: bool = False,
        mem_model_norm_add_residual: bool = True,
        store_with_lookahead_value: bool = False,
        default_model_kwargs: dict = dict(depth=2, expansion_factor=4.0),
    ):
        super().__init__()
        dim_head = dim if dim_head is None else dim_head
        if heads == 1 and dim_head != dim:
            raise ValueError(f"dim_head ({dim_head}) must equal dim ({dim}) with a single head")
        retrieve_chunk, store_chunk = chunk_size if isinstance(chunk_size, (tuple, list)) else (chunk_size,) * 2
        if retrieve_chunk != store_chunk:
            raise NotImplementedError("chunk_size with different retrieve and store sizes")
        if batch_size is not None and batch_size % store_chunk:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the chunk size ({store_chunk})")
        if learned_momentum_combine and not (momentum and momentum_order > 1):
            raise ValueError("learned_momentum_combine needs momentum with momentum_order > 1")
        if attn_pool_chunks and store_chunk == 1:
            raise ValueError("attn_pool_chunks needs chunk_size > 1")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
            activation = ACTIVATIONS[activation]

        model = build_memory_model(model) if model is not None else MemoryMLP(dim_head, **default_model_kwargs)
        if mem_model_norm_add_residual:
            model = ResidualNorm(model)
        self.memory_model = model
        self.chunk_size = store_chunk
        self.batch_size = batch_size
        self.heads, self.dim_head, self.dim = heads, dim_head, dim
        self.per_head_learned_parameters = per_head_learned_parameters
        # a switch like `training`, not state: True (memory_frozen) turns test-time learning off, reads go on
        self.frozen = False
        self.structure = Structure(
            dim=dim, heads=heads, dim_head=dim_head, chunk_size=store_chunk, num_kv_per_token=num_kv_per_token,
            model=model, views=qkv_receives_diff_views, pre_rmsnorm=pre_rmsnorm, qk_rmsnorm=qk_rmsnorm,
            post_rmsnorm=post_rmsnorm, momentum=momentum, momentum_order=momentum_order,
            learned_combine=learned_momentum_combine, combine_include_zeroth=learned_combine_include_zeroth,
            layer_lr_modulation=per_parameter_lr_modulation, attn_pool=attn_pool_chunks,
            weight_residual=accept_weight_residual, spectral_norm=spectral_norm_surprises,
            clamp_grad_norm=max_grad_norm is not None, lookahead=store_with_lookahead_value,
            gated_transition=gated_transition, activation=activation,
            step_transform=adaptive_step_transform, loss_fn=store_memory_loss_fn,
        )
        # hyper-parameters are arrays so a new value reuses the compiled step
        self._hparams = {
            "max_lr": mx.array(default_step_transform_max_lr, dtype=mx.float32),
            "max_grad_norm": mx.array(max_grad_norm or 0.0, dtype=mx.float32),
            "max_mem_layer_modulation": mx.array(max_mem_layer_modulation, dtype=mx.float32),
        }

        inner = heads * dim_head
        if pre_rmsnorm:
            self.retrieve_norm, self.store_norm = _RMSNorm(dim), _RMSNorm(dim)
        if post_rmsnorm:
            self.multihead_rmsnorm = _Gamma((heads, 1, dim_head))
        if qk_rmsnorm:
            self.q_norm, self.k_norm = _Gamma((heads, 1, dim_head)), _Gamma((heads, 1, dim_head))
        self.to_queries = nn.Linear(dim, inner, bias=False)
        self.to_keys = nn.Linear(dim, inner * num_kv_per_token, bias=False)
        self.to_values = nn.Linear(dim, inner * num_kv_per_token, bias=False)
        self.to_adaptive_step = nn.Linear(dim, heads * num_kv_per_token)
        self.to_decay_factor = nn.Linear(dim, heads)
        if momentum:
            self.to_momentum = nn.Linear(dim, heads * momentum_order)
        if learned_momentum_combine:
            self.to_learned_momentum_combine = nn.Linear(dim, heads * (momentum_order + learned_combine_include_zeroth))
        if per_parameter_lr_modulation:
            self.to_layer_modulation = nn.Linear(dim, heads * len(model.shapes()))
        if accept_weight_residual:
            self.to_learned_weight_residual_mix = nn.Linear(dim, heads)
        if attn_pool_chunks:
            self.reduce_to_chunk_rep = _AttentionPool(dim)
        if heads > 1:
            self.retrieve_gate = nn.Linear(dim, heads, bias=False)
            self.combine_heads = nn.Linear(inner, dim, bias=False)
        if gated_transition:
            self.transition_gate = mx.array(-5.0)
        for name, bias in (("to_adaptive_step", init_adaptive_step_bias), ("to_momentum", init_momentum_bias),
                           ("to_decay_factor", init_decay_bias)):
            if bias is not None and name in self:
                self[name].weight = mx.zeros_like(self[name].weight)
                self[name].bias = mx.full(self[name].bias.shape, bias)
        init = model.init()
        self.memory_model_parameters = [
            mx.broadcast_to(w, (heads, *w.shape)) + 0 if per_head_learned_parameters else w for w in init
        ]

    # ---- checkpoints --------------------------------------------------------------------------------------------

    @staticmethod
    def cast_predicate(key: str) -> bool:
        """Whether a dtype conversion (``convert --dtype``, mlx-lm's convert) may cast this weight: not the memory's
        initial fast weights, which it computes with in float32."""
        return "memory_model_parameters" not in key

    @staticmethod
    def quant_predicate(path: str, module: nn.Module):
        """mlx-lm's ``quantize_model`` hook (``convert -q``), path relative to this memory: the gates stay
        unquantized, the attention pool's logits go to 8 bits, the query/key/value/head projections take the requested
        bits. The fast weights (``memory_model_parameters``) are plain arrays, which quantization never touches."""
        name = path.split(".")[0]
        if not hasattr(module, "to_quantized") or name in GATES:
            return False
        if name == "reduce_to_chunk_rep":
            return eight_bits(module)
        return True

    def _dense_parameters(self) -> dict:
        """The parameters the store/retrieve step computes with (not the fast weights nor the transition gate), every
        projection as a plain ``weight``/``bias``: the one place a quantized projection is dequantized, since the
        compiled step multiplies by these weights itself instead of calling the layers."""
        params = {k: v for k, v in self.parameters().items() if k not in ("memory_model_parameters", "transition_gate")}
        for path, module in self.named_modules():
            if isinstance(module, nn.QuantizedLinear):
                *parents, name = path.split(".")
                node = params
                for parent in parents:
                    node = node[parent]
                node[name] = {"weight": mx.dequantize(module.weight, module.scales, module.get("biases"),
                                                      module.group_size, module.bits, mode=module.mode)}
                if "bias" in module:
                    node[name]["bias"] = module.bias
        return params

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """titans-pytorch state-dict names -> ours. Drops the ``memory_model.*`` templates (they alias
        ``memory_model_parameters.*``, the tensors the forward uses) and unwraps ``Sequential`` indices."""
        out = {}
        for k, v in weights.items():
            if k.startswith("memory_model.") or k == "zero":
                continue
            for seq in ("to_queries", "to_keys", "to_values", "to_adaptive_step", "to_decay_factor", "to_momentum",
                        "to_learned_momentum_combine", "to_layer_modulation", "to_learned_weight_residual_mix",
                        "retrieve_gate"):
                if k.startswith(seq + ".0."):
                    k = seq + k[len(seq) + 2:]
            out[k] = v
        return out

    # ---- state --------------------------------------------------------------------------------------------------

    def _expand_heads(self, w, batch):
        # (H, *shape) or shared (*shape) -> (b*H, *shape), batch-major as titans-pytorch's (b h)
        if not self.per_head_learned_parameters:
            w = mx.broadcast_to(w, (self.heads, *w.shape))
        return mx.broadcast_to(mx.expand_dims(w, 0), (batch, *w.shape)).reshape(batch * self.heads, *w.shape[1:])

    def initial_state(self, batch: int, dtype=None) -> MemoryState:
        # the fast weights are float32 (float64 stays) whatever the model's dtype: see __call__
        weights = [self._expand_heads(w.astype(wide(w.dtype)), batch) for w in self.memory_model_parameters]
        s = self.structure
        momentum = [mx.zeros((s.momentum_order, *w.shape), w.dtype) for w in weights] if s.momentum else None
        dtype = dtype or weights[0].dtype
        buffer = mx.zeros(((2,) if s.views else ()) + (batch, 0, self.dim), dtype)
        context = None if self.memory_model.tokenwise else mx.zeros((batch, 1, self.dim), dtype)
        return MemoryState(0, weights, list(weights), momentum, buffer, context)

    def _check_state(self, state: MemoryState, batch: int):
        if not isinstance(state, MemoryState):
            raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
        expected = self.initial_state(batch)
        for name in ("grad_point", "last_update", "momentum"):
            got, want = getattr(state, name), getattr(expected, name)
            if (got is None) != (want is None) or (want and [a.shape for a in got] != [a.shape for a in want]):
                raise ValueError(f"state does not fit this NeuralMemory (batch {batch}): {name} has shapes "
                                 f"{None if got is None else [a.shape for a in got]}, expected "
                                 f"{None if want is None else [a.shape for a in want]}")
        lead = expected.buffer.shape[:-2]
        if state.buffer.shape[:-2] != lead or state.buffer.shape[-1] != self.dim or state.buffer.shape[-2] >= \
                self.chunk_size or state.seq_index % self.chunk_size:
            raise ValueError(f"state does not fit this NeuralMemory: buffer shape {state.buffer.shape}, seq_index "
                             f"{state.seq_index} (chunk size {self.chunk_size}, dim {self.dim})")
        context = state.read_context
        if (context is None) != self.memory_model.tokenwise or (context is not None and context.shape != (
                batch, state.buffer.shape[-2] + 1, self.dim)):
            raise ValueError(f"state does not fit this NeuralMemory: read_context "
                             f"{None if context is None else context.shape}")

    def _check_input(self, x):
        if not isinstance(x, mx.array):
            raise ValueError(f"input must be an mx.array, got {type(x).__name__}")
        views = self.structure.views
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"input must be floating point, got {x.dtype}")
        if x.ndim == 2 + views:  # a single token per batch element, as titans-pytorch accepts
            x = mx.expand_dims(x, -2)
        if x.ndim != 3 + views or (views and x.shape[0] != 3) or x.shape[-1] != self.dim:
            want = "(3, batch, n, dim)" if views else "(batch, n, dim)"
            raise ValueError(f"input must have shape {want} with dim={self.dim}, got {tuple(x.shape)}")
        return x

    def _check_prev_weights(self, prev, batch, n_chunks):
        # titans-pytorch passes a dict of named tensors; its values in parameter order are the same thing
        prev = list(prev.values()) if isinstance(prev, dict) else list(prev)
        shapes = [(batch * self.heads, *shape) for shape in self.memory_model.shapes()]
        if len(prev) != len(shapes) or any(not isinstance(w, mx.array) or w.ndim != len(shape) + 1 or
                                           w.shape[0] != shape[0] or w.shape[2:] != shape[1:] or w.shape[1] < n_chunks
                                           for w, shape in zip(prev, shapes)):
            got = [tuple(w.shape) if isinstance(w, mx.array) else type(w).__name__ for w in prev]
            raise ValueError(f"prev_weights must be {len(shapes)} arrays (batch*heads, >= {n_chunks} chunks, *shape) "
                             f"for shapes {shapes}, got {got}")
        return prev

    # ---- forward ------------------------------------------------------------------------------------------------

    def _block_chunks(self, batch):
        per_chunk = sum(math.prod(s) for s in self.memory_model.shapes()) * batch * self.heads * 4
        k = max(1, min(MAX_BLOCK_CHUNKS, BLOCK_BYTES // per_chunk))
        return 1 << (k.bit_length() - 1)

    def block_tokens(self, batch: int = 1) -> int:
        """Tokens per processing block. The forward never evaluates: a caller that wants bounded memory on a long
        input feeds it in pieces of this size with ``state`` and evaluates between them."""
        return self._block_chunks(batch) * self.chunk_size

    def _blocks(self, first_chunk, n_chunks, ttt, batch):
        """(first chunk, chunk count, ends a TTT mini-batch) of each processing block; blocks never cross a
        mini-batch boundary, since the gradient point changes there."""
        C, kmax, c0 = self.chunk_size, self._block_chunks(batch), 0
        while c0 < n_chunks:
            kc = min(kmax, n_chunks - c0)
            if ttt is not None:
                kc = min(kc, ttt // C - (first_chunk + c0) % (ttt // C))
            yield c0, kc, self.ends_batch(first_chunk + c0 + kc, ttt)
            c0 += kc

    def ends_batch(self, chunks: int, ttt: Optional[int]) -> bool:
        """Whether the first ``chunks`` chunks end a TTT mini-batch (the gradient point moves to the latest weights
        there); ttt: the mini-batch in tokens, or None (one mini-batch: the whole sequence)."""
        return ttt is not None and (chunks * self.chunk_size) % ttt == 0

    def _block_hparams(self, dtype) -> dict:
        hparams = {k: v.astype(dtype) for k, v in self._hparams.items()}
        if "transition_gate" in self:
            hparams["transition_gate"] = mx.sigmoid(self.transition_gate.astype(dtype))
        return hparams

    def _params_as(self, dtype) -> dict:
        return tree_map(lambda a: a if a.dtype == dtype else a.astype(dtype), self._dense_parameters())

    def _views(self, x):
        # (the caller's dtype, x in the memory's dtype, the query-view tokens, the store-view tokens); the memory
        # computes in float32 whatever the model's dtype (float64 stays): its weights are learned online over the
        # whole document, so its state and updates keep float32 (as ttt-lm-mlx keeps its TTT state)
        x = self._check_input(x)
        out_dtype = x.dtype
        x = x.astype(wide(x.dtype))
        return (out_dtype, x) + ((x[0], x[1:]) if self.structure.views else (x, x))

    def read_current(self, x, last_update: list):
        """What ``__call__`` gives tokens that read the memory as it stands (no chunk completes before them):
        (y, the store-view tokens it appends to the state's buffer). The compiled decode step's memory read: no
        Python ints, so it traces once; only for memory networks that read each token on its own (tokenwise)."""
        out_dtype, x, retrieve_x, store_new = self._views(x)
        return retrieve(self.structure, self._params_as(x.dtype), last_update, retrieve_x).astype(out_dtype), store_new

    def complete_chunk(self, x, grad_point: list, last_update: list, momentum, buffer, write, boundary, prev=None):
        """What ``__call__`` gives the one token that completes a chunk, the chunk's other C - 1 store-view tokens
        being ``buffer``: the chunk is stored, then the token reads the new weights. Returns (y, last_update,
        momentum or []). write: (1,) bool, False when the memory is frozen; boundary: (1,) bool, True when the chunk
        ends a TTT mini-batch (see ends_batch; the caller then moves the gradient point); prev: with a weight
        residual, the previous memory layer's weights before this chunk, (BH, *shape) each. The compiled decode
        step's store: arrays only, so it traces once; for tokenwise memory networks."""
        out_dtype, x, retrieve_x, store_new = self._views(x)
        store = mx.concatenate([buffer.astype(x.dtype), store_new], axis=-2)
        read = mx.pad(retrieve_x, [(0, 0), (0, self.chunk_size - retrieve_x.shape[1]), (0, 0)])
        last_update, momentum, y, _, _ = store_block(
            self.structure, False, self._params_as(x.dtype), self._block_hparams(x.dtype), grad_point, last_update,
            momentum or None, store, write, boundary, read, None if prev is None else [w[:, None] for w in prev],
            use_kernel=not self.training)
        return y[:, :retrieve_x.shape[1]].astype(out_dtype), last_update, momentum or []

    def __call__(self, x, state=None, prev_weights=None, return_surprises=False, return_updates=False,
                 detach_mem_state=False, ttt_batch_size=None, store_seq=None, store_mask=None, return_stats=False):
        """Read and write x; returns (y, new_state), then (losses, step sizes) with ``return_surprises`` (as
        titans-pytorch's), the weights after every chunk with ``return_updates`` (as titans-pytorch's), and with
        ``return_stats`` (ours, for ``python -m titans_mlx.inspect``) a dict of per-chunk arrays (batch, heads, chunks)
        of the chunks this call completed: ``forget`` (the forget gate alpha: the weights are scaled by 1 - alpha),
        ``update_norm`` (norm of the update added), ``weight_norm`` (norm of the weights after the chunk), and
        ``first_chunk``, the index of the first of them in the whole sequence."""
        if store_seq is not None or store_mask is not None:
            raise NotImplementedError("store_seq / store_mask")
        s, C = self.structure, self.chunk_size
        if s.weight_residual != (prev_weights is not None):
            raise ValueError("prev_weights must be given exactly when accept_weight_residual=True")
        out_dtype, x, retrieve_x, store_new = self._views(x)
        batch, m = retrieve_x.shape[0], retrieve_x.shape[1]
        state = self.initial_state(batch, x.dtype) if state is None else state
        self._check_state(state, batch)
        ttt = ttt_batch_size or self.batch_size
        if ttt is not None and ttt % C:
            raise ValueError(f"ttt_batch_size ({ttt}) must be a multiple of the chunk size ({C})")

        store_all = mx.concatenate([state.buffer.astype(x.dtype), store_new], axis=-2)
        first_chunk = state.seq_index // C
        n_chunks = store_all.shape[-2] // C
        if s.weight_residual:
            prev_weights = self._check_prev_weights(prev_weights, batch, n_chunks)
        p = state.seq_index + state.buffer.shape[-2]  # absolute position of the first new token
        # tokens before position seq_index + C - 1 read the memory as it stands now; the rest read it in windows of
        # C tokens, window j after the j-th chunk completed in this call
        head = min(m, max(0, state.seq_index + C - 1 - p))
        params = self._params_as(x.dtype)
        outputs = []
        context = state.read_context
        if context is not None:  # the window's earlier tokens are part of what a cross-token memory reads
            retrieve_x = mx.concatenate([context.astype(x.dtype), retrieve_x], axis=1)
            retrieve_x, context = retrieve_x[:, context.shape[1]:], retrieve_x
        if head:
            if context is None:
                outputs.append(retrieve(s, params, state.last_update, retrieve_x[:, :head]))
            else:
                skip = context.shape[1] - m
                outputs.append(retrieve(s, params, state.last_update, context[:, :skip + head])[:, skip:])

        grad_point, last_update, momentum = list(state.grad_point), list(state.last_update), state.momentum
        body = retrieve_x[:, head:]
        n_windows = -(-body.shape[1] // C)
        body = mx.pad(body, [(0, 0), (0, n_windows * C - body.shape[1]), (0, 0)])
        updates, losses, lrs, stats = [[w[:, None]] for w in last_update], [], [], []
        step = _compiled_store_block(s, return_updates, return_stats, not self.training)
        hparams = self._block_hparams(x.dtype)
        for c0, kc, ends_batch in self._blocks(first_chunk, n_chunks, ttt, batch):
            K = 1 << (kc - 1).bit_length()  # bucket the block size: a handful of compiled shapes
            pad = [(0, 0)] * (store_all.ndim - 2) + [(0, (K - kc) * C), (0, 0)]
            block_store = mx.pad(store_all[..., c0 * C:(c0 + kc) * C, :], pad)
            kw = max(0, min(kc, n_windows - c0))
            block_read = mx.pad(body[:, c0 * C:(c0 + kw) * C], [(0, 0), (0, (K - kw) * C), (0, 0)])
            # frozen: no chunk writes (the recurrences keep every weight), the reads still run
            valid = mx.arange(K) < (0 if self.frozen else kc)
            boundary = mx.arange(K) == (kc - 1 if ends_batch and not self.frozen else -1)
            prev = None
            if s.weight_residual:
                prev = [mx.pad(w[:, c0:c0 + kc], [(0, 0), (0, K - kc)] + [(0, 0)] * (w.ndim - 2))
                        for w in prev_weights]
            last_update, momentum, read, ups, (loss, lr, *block_stats) = step(
                params, hparams, grad_point, last_update, momentum, block_store, valid, boundary, block_read, prev)
            outputs.append(read[:, :kw * C])
            if return_updates:
                for acc, u in zip(updates, ups):
                    acc.append(u[:, :kc])
            if return_surprises:
                losses.append(loss[:, :kc])
                lrs.append(lr[:, :kc])
            if return_stats:
                stats.append([t[:, :kc] for t in block_stats])
            if ends_batch and not self.frozen:  # the next mini-batch takes its gradients at the latest weights
                grad_point = list(last_update)

        y = mx.concatenate(outputs, axis=1)[:, :m] if outputs else mx.zeros((batch, 0, self.dim), x.dtype)
        y = y.astype(out_dtype)
        new_state = MemoryState(state.seq_index + n_chunks * C, grad_point, last_update, momentum,
                                store_all[..., n_chunks * C:, :],
                                None if context is None else context[:, n_chunks * C:])
        if detach_mem_state:
            new_state = new_state.detach()
        result = (y, new_state)
        if return_surprises:
            shape = lambda t: t.reshape(batch, self.heads, -1)
            empty = mx.zeros((batch, self.heads, 0), x.dtype)
            result += ((shape(mx.concatenate(losses, 1)) if losses else empty,
                        shape(mx.concatenate(lrs, 1)) if lrs else empty),)
        if return_updates:
            result += ([mx.concatenate(u, axis=1) for u in updates],)
        if return_stats:
            per_chunk = lambda i: (mx.concatenate([st[i] for st in stats], axis=1) if stats else
                                   mx.zeros((batch * self.heads, 0), x.dtype)).reshape(batch, self.heads, -1)
            result += ({"first_chunk": first_chunk, "forget": per_chunk(0), "update_norm": per_chunk(1),
                        "weight_norm": per_chunk(2)},)
        return result


@contextmanager
def memory_frozen(model: nn.Module):
    """Test-time learning off inside the block: every NeuralMemory in ``model`` reads its current weights and writes
    nothing (its state still advances through the sequence); on exit each memory is as it was. A recall that survives
    freezing did not come from the memory.

        with memory_frozen(model):
            logits = model(tokens, cache=cache)
    """
    memories = [m for _, m in model.named_modules() if isinstance(m, NeuralMemory)]
    before = [m.frozen for m in memories]
    for m in memories:
        m.frozen = True
    try:
        yield model
    finally:
        for m, was in zip(memories, before):
            m.frozen = was
