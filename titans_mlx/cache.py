"""The MAC transformer's cache, made of mlx-lm's own cache classes, so that mlx-lm's tools handle it as they are:
``save_prompt_cache``/``load_prompt_cache`` (which rebuild classes by name from mlx_lm.models.cache), ``copy.deepcopy``
and ``nbytes`` for the server's prompt cache, ``mx.eval([c.state for c in cache])`` between prefill blocks.

A flat list with two entries per layer (``model.make_cache()``):

- ``ChunkedKVCache``: rotated keys and values of the positions the next queries can still see (the current window;
  with sliding attention also the previous one). ``offset`` is the global position of the next query, positions
  counting the interleaved long-term memory tokens; ``start_position`` is the position of the first cached key.
  These are exactly ChunkedKVCache's fields; the attention sets them itself instead of calling ``update_and_fetch``,
  because what stays visible is decided by segments, not by a count of keys.
- ``ArraysCache``: the layer's NeuralMemory state, slots ``[buffer, read_context, *grad_point, *last_update,
  *momentum]`` (unused slots None; a single None slot in a layer without memory). The memory's ``seq_index`` is
  not stored: the memory has seen every position before ``offset``, so it is ``offset - len(buffer)``. The
  paper-order MAC (titans_mlx.variants) adds one last slot: its memory's weights at the current segment's start,
  flattened into one array (the segment's remaining tokens still read them).

Why these classes: mlx-lm's server batches requests when every cache entry has ``merge``, converting caches into
left-padded batch caches; left padding would shift a sequence's segment layout and write padding into its memory.
ChunkedKVCache has no ``merge``, so the server answers a Titans model's requests one at a time. CacheList (which has
``merge``) is avoided for the same reason. A memory cannot be un-written: ArraysCache is not trimmable, so neither
is the cache (``can_trim_prompt_cache`` is False) and mlx-lm never trims it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, ChunkedKVCache

from .memory import MemoryState


def make_layer_cache(max_keys: int, memory_tensors: int, segment_start: bool = False) -> list:
    """The two cache entries of one layer; memory_tensors: its memory model's weight tensors (0: no memory);
    segment_start: one more slot for the memory's weights at the segment's start (the paper-order MAC)."""
    return [ChunkedKVCache(max_keys), ArraysCache(2 + 3 * memory_tensors + segment_start if memory_tensors else 1)]


def read_memory_state(entry: ArraysCache, position: int) -> Optional[MemoryState]:
    """The NeuralMemory state an ArraysCache holds (None before the layer's first call); position: positions seen."""
    slots = entry.cache
    if slots[0] is None:
        return None
    n = (len(slots) - 2) // 3  # the optional segment-start slot does not change it
    buffer, context = slots[0], slots[1]
    momentum = slots[2 + 2 * n:2 + 3 * n]
    return MemoryState(position - buffer.shape[-2], list(slots[2:2 + n]), list(slots[2 + n:2 + 2 * n]),
                       None if momentum[0] is None else list(momentum), buffer, context)


def memory_states(cache: list) -> list:
    """Each layer's NeuralMemory state in a model's cache (None: a layer without memory, or nothing read yet)."""
    return [read_memory_state(memory, attention.offset) for attention, memory in zip(cache[0::2], cache[1::2])]


def write_memory_state(entry: ArraysCache, state: MemoryState, segment_start: Optional[list] = None) -> None:
    n = len(state.grad_point)
    slots = 2 + 3 * n + (segment_start is not None)
    if len(entry.cache) != slots:
        raise ValueError(f"this cache entry holds {len(entry.cache)} slots, a memory state of {n} tensors needs "
                         f"{slots}; use model.make_cache()")
    entry.cache = [state.buffer, state.read_context, *state.grad_point, *state.last_update,
                   *(state.momentum or [None] * n)]
    if segment_start is not None:  # (BH, *shape) each, flattened into one (BH, total) array
        entry.cache.append(mx.concatenate([w.reshape(w.shape[0], -1) for w in segment_start], axis=1))


def read_segment_start(entry: ArraysCache, like: list) -> Optional[list]:
    """The weights write_memory_state kept as segment_start, shaped like the arrays of `like`; None if absent."""
    flat = entry.cache[-1] if len(entry.cache) % 3 == 0 else None  # 2 + 3n + 1 slots
    if flat is None:
        return None
    sizes = [w.size // w.shape[0] for w in like]
    cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return [part.reshape(w.shape) for part, w in zip(mx.split(flat, cuts, axis=1), like)]


def check_cache(model, cache: list) -> None:
    """Raise ValueError (one line) unless `cache` is a cache of this MAC model that its forward can continue.

    For caches read from a file: a loaded cache gets its shapes from the file, and a wrong one would otherwise fail
    deep inside the forward.
    """
    fresh = model.make_cache()
    if not isinstance(cache, (list, tuple)) or len(cache) != len(fresh):
        raise ValueError(f"the cache has {len(cache) if isinstance(cache, (list, tuple)) else 'no'} entries, this "
                         f"model's has {len(fresh)} (two per layer)")
    for i, (got, want) in enumerate(zip(cache, fresh)):
        if type(got) is not type(want):
            raise ValueError(f"cache entry {i} is a {type(got).__name__}, this model's is a {type(want).__name__}")
        if isinstance(want, ArraysCache) and len(got.cache) != len(want.cache):
            raise ValueError(f"cache entry {i} holds {len(got.cache)} arrays, this model's memory {len(want.cache)}")
    offsets = {c.offset for c in cache[0::2]}
    if len(offsets) != 1 or not all(isinstance(o, int) and o >= 0 for o in offsets):
        raise ValueError(f"the layers' caches are at different positions {sorted(offsets)}")
    position = offsets.pop()
    for i, layer in enumerate(model.layers):
        attention, memory = cache[2 * i], cache[2 * i + 1]
        attn = getattr(layer, "attn", None)  # None: a block without attention (the memory alone), keys never kept
        if attention.keys is not None and attn is not None:
            shape, want = tuple(attention.keys.shape), (attn.heads, attention.offset - attention.start_position,
                                                        attn.cached_width)
            if len(shape) != 4 or shape[1:] != want or tuple(attention.values.shape) != shape:
                raise ValueError(f"layer {i + 1}: attention cache of shape {shape}, this model needs (batch, *{want})")
        elif attention.keys is not None or (position and attn is not None):
            raise ValueError(f"layer {i + 1}: the attention cache is {'not ' if attn is None else ''}empty at "
                             f"position {position}")
        state = read_memory_state(memory, position) if layer.has_memory else None
        if state is not None:
            batch = state.buffer.shape[-3]
            try:
                layer.mem._check_state(state, batch)
            except ValueError as e:
                raise ValueError(f"layer {i + 1}: {e}") from None
        elif layer.has_memory and position:
            raise ValueError(f"layer {i + 1}: the memory state is missing at position {position}")
