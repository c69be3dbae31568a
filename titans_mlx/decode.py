"""The MAC transformer's single-token decode step as one compiled function (``mx.compile``).

A decoded token costs thousands of tiny operations, each paying dispatch; compiled, the step is traced once and its
element-wise work fused. It covers every token that reads the memory as it stands: all but the token that completes
a memory chunk (it stores the chunk) and the token after a segment (the long-term memory tokens come first); those,
and prompts, take ``Model.__call__``'s general path. Inside the function there are only arrays: the position is an
int32 array and each attention window is padded to a fixed length with its key positions (-1 for empty slots), so
nothing recompiles as the context grows. Outside it, the mlx-lm cache objects are read before the call and updated
after it (keys appended and trimmed to the window, the memory's buffer extended), exactly as the general path does.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import read_memory_state, write_memory_state

TRACES = {"token_step": 0}  # times the step was traced (tests check that decoding never retraces)


def eligible(model, cache: list, inputs: mx.array) -> bool:
    """Whether the call model(inputs, cache) may take the compiled step (else the general path, which also names
    what does not fit)."""
    if inputs.shape[1] != 1 or not all(getattr(layer, "compiled_decode", False) for layer in model.layers):
        return False  # several tokens, or blocks other than titans-pytorch's MAC layer (variants.py)
    start = cache[0].offset
    if model.positions_for(model._tokens_before(start) + 1) - start != 1:  # long-term tokens come first
        return False
    starts = {c.start_position for c in cache[0::2]}
    if len(starts) != 1 or any(c.keys is None or c.keys.shape[0] != inputs.shape[0] for c in cache[0::2]):
        return False
    for layer, memory in zip(model.layers, cache[1::2]):
        if layer.has_memory:
            buffer = memory[0]
            if buffer is None or not layer.mem.memory_model.tokenwise or buffer.shape[-2] + 1 >= layer.mem.chunk_size:
                return False  # the first call, a memory that reads across tokens, or this token completes a chunk
    return True


def _layer(layer, x, pos, keys, values, key_pos, weights, value_residual, views):
    # MACLayer.__call__ for one token that reads the memory as it stands (no store: the weight residual, which
    # mixes weights only into stores, does not enter); also returns what the caller caches
    stores, new = [], []

    def memory(qkv):
        retrieved, store = layer.mem.read_current(qkv, weights)
        stores.append(store)
        return retrieved

    def attend(attn_in, gates):
        out, unmixed, k, v = layer.attn.decode_token(attn_in, pos, keys, values, key_pos, value_residual, gates)
        new.extend([k, v])
        return out, unmixed

    x, unmixed, views = layer.wire(x, views, memory, attend)
    return x, unmixed, views, new[0], new[1], stores[0] if stores else None


def _token_step(model, tokens, pos, keys, values, key_pos, weights):
    TRACES["token_step"] += 1
    x = model.token_emb(tokens)
    if model.axial_pos_emb is not None:
        x = x + model.axial_pos_emb.at(pos, x.dtype)
    streams = model.args.num_residual_streams
    if streams > 1:
        x = x[:, :, None, :] + model.stream_embed.astype(x.dtype)
    value_residual, views, new_keys, new_values, stores = None, [], [], [], []
    for i, layer in enumerate(model.layers):
        x, unmixed, views, k, v, store = _layer(layer, x, pos, keys[i], values[i], key_pos, weights[i],
                                                value_residual, views)
        value_residual = unmixed if value_residual is None else value_residual
        new_keys.append(k)
        new_values.append(v)
        stores.append(store)
    if streams > 1:
        x = x.sum(axis=2)
    return model.to_logits(model.norm(x)), new_keys, new_values, stores


def _compiled(model):
    # one compiled function per model, kept on it (a memo, not state: it holds no arrays of the computation); the
    # model's parameters are inputs, read at each call
    step = getattr(model, "_compiled_token_step", None)
    if step is None:
        step = mx.compile(lambda *a: _token_step(model, *a), inputs=model.state)
        object.__setattr__(model, "_compiled_token_step", step)
    return step


def step(model, inputs: mx.array, cache: list) -> mx.array:
    """model(inputs, cache) for one eligible token (see ``eligible``): logits (b, 1, num_tokens)."""
    start = cache[0].offset
    attention, memory = cache[0::2], cache[1::2]
    k_start = attention[0].start_position
    pad = [layer.attn.max_cached_keys - c.keys.shape[2] for layer, c in zip(model.layers, attention)]
    size = model.layers[0].attn.max_cached_keys
    key_pos = np.full(size, -1, dtype=np.int32)
    key_pos[: start - k_start] = np.arange(k_start, start)
    keys = [mx.pad(c.keys, [(0, 0), (0, 0), (0, p), (0, 0)]) for c, p in zip(attention, pad)]
    values = [mx.pad(c.values, [(0, 0), (0, 0), (0, p), (0, 0)]) for c, p in zip(attention, pad)]
    states = [read_memory_state(m, start) if layer.has_memory else None for layer, m in zip(model.layers, memory)]
    weights = [s.last_update if s is not None else [] for s in states]
    logits, new_keys, new_values, stores = _compiled(model)(
        inputs, mx.array(start, dtype=mx.int32), keys, values, mx.array(key_pos), weights)
    for layer, c, k, v in zip(model.layers, attention, new_keys, new_values):
        layer.attn.remember(c, mx.concatenate([c.keys, k], axis=2), mx.concatenate([c.values, v], axis=2),
                            k_start, start + 1)
    for m, state, store in zip(memory, states, stores):
        if state is not None:
            state.buffer = mx.concatenate([state.buffer.astype(store.dtype), store], axis=-2)
            write_memory_state(m, state)
    return logits
