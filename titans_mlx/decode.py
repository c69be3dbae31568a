"""The MAC transformer's single-token decode step as compiled functions (``mx.compile``).

A decoded token costs thousands of tiny operations, each paying dispatch; compiled, the step is traced once and its
element-wise work fused. Two steps cover every decoded token but the one after a segment (the long-term memory
tokens come first) and prompts, which take ``Model.__call__``'s general path: the token that reads the memory as it
stands, and the token that completes a memory chunk, which stores the chunk and reads the new weights (a separate
compiled function, since it carries the memory's gradient point, momentum and chunk buffer). Inside them there are
only arrays: the position is an int32 array, the TTT mini-batch boundary and the frozen switch are bool arrays, and
each attention window is padded to a fixed length with its key positions (-1 for empty slots), so nothing
recompiles as the context grows. Outside them, the mlx-lm cache objects are read before the call and updated after
it (keys appended and trimmed to the window, the memory's buffer extended or its new state written), exactly as
the general path does.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from . import memory_step
from .cache import read_memory_state, write_memory_state

TRACES = {"token_step": 0, "store_step": 0}  # times each step was traced (tests check that decoding never retraces)


def eligible(model, cache: list, inputs: mx.array) -> Optional[tuple]:
    """Whether the call model(inputs, cache) may take a compiled step: the plan, per layer whether its memory
    completes a chunk at this token (False without memory), or None for the general path (which also names what
    does not fit)."""
    if inputs.shape[1] != 1 or not all(getattr(layer, "compiled_decode", False) for layer in model.layers):
        return None  # several tokens, or blocks other than titans-pytorch's MAC layer (variants.py)
    start = cache[0].offset
    if model.positions_for(model._tokens_before(start) + 1) - start != 1:  # long-term tokens come first
        return None
    starts = {c.start_position for c in cache[0::2]}
    if len(starts) != 1 or any(c.keys is None or c.keys.shape[0] != inputs.shape[0] for c in cache[0::2]):
        return None
    plan, earlier = [], None  # earlier: whether the previous memory layer completes a chunk here
    for layer, memory in zip(model.layers, cache[1::2]):
        if not layer.has_memory:
            plan.append(False)
            continue
        buffer = memory[0]
        if buffer is None or not layer.mem.memory_model.tokenwise:
            return None  # the first call, or a memory that reads across tokens
        completes = buffer.shape[-2] + 1 == layer.mem.chunk_size
        if completes and layer.mem.structure.weight_residual and not earlier:
            return None  # its store mixes in the previous memory layer's weights before the same chunk
        plan.append(completes)
        earlier = completes
    return tuple(plan)


def _layer(layer, x, pos, keys, values, key_pos, memory_in, completes, prev, value_residual, views):
    # MACLayer.__call__ for one token: the memory reads as it stands (the weight residual, which mixes weights only
    # into stores, does not enter), or stores the chunk this token completes (prev: the previous memory layer's
    # weights before it, for the weight residual) and reads the new weights; also returns what the caller caches
    new, memory_out = [], []

    def memory(qkv):
        if completes:
            residual = prev if layer.mem.structure.weight_residual else None
            retrieved, last_update, momentum = layer.mem.complete_chunk(qkv, *memory_in, prev=residual)
            memory_out.append([last_update, momentum])
        else:
            retrieved, store = layer.mem.read_current(qkv, memory_in)
            memory_out.append(store)
        return retrieved

    def attend(attn_in, gates):
        out, unmixed, k, v = layer.attn.decode_token(attn_in, pos, keys, values, key_pos, value_residual, gates)
        new.extend([k, v])
        return out, unmixed

    x, unmixed, views = layer.wire(x, views, memory, attend)
    return x, unmixed, views, new[0], new[1], memory_out[0] if memory_out else None


def _token_step(model, plan, tokens, pos, keys, values, key_pos, memory_in):
    TRACES["store_step" if any(plan) else "token_step"] += 1
    x = model.token_emb(tokens)
    if model.axial_pos_emb is not None:
        x = x + model.axial_pos_emb.at(pos, x.dtype)
    streams = model.args.num_residual_streams
    if streams > 1:
        x = x[:, :, None, :] + model.stream_embed.astype(x.dtype)
    value_residual, views, new_keys, new_values, memory_out, prev = None, [], [], [], [], None
    for i, layer in enumerate(model.layers):
        x, unmixed, views, k, v, out = _layer(layer, x, pos, keys[i], values[i], key_pos, memory_in[i], plan[i],
                                              prev, value_residual, views)
        if plan[i]:
            prev = memory_in[i][1]  # this memory's weights before the chunk: the next one's weight residual
        value_residual = unmixed if value_residual is None else value_residual
        new_keys.append(k)
        new_values.append(v)
        memory_out.append(out if out is not None else [])
    if streams > 1:
        x = x.sum(axis=2)
    return model.to_logits(model.norm(x)), new_keys, new_values, memory_out


def _compiled(model, plan: tuple):
    # one compiled function per model and plan, kept on it (a memo, not state: it holds no arrays of the
    # computation); the model's parameters are inputs, read at each call
    steps = getattr(model, "_compiled_token_steps", None)
    if steps is None:
        steps = {}
        object.__setattr__(model, "_compiled_token_steps", steps)
    key = (plan, model.training, memory_step.forms_key())  # the memory stores' form may change with these
    if key not in steps:
        steps[key] = mx.compile(lambda *a: _token_step(model, plan, *a), inputs=model.state)
    return steps[key]


def step(model, inputs: mx.array, cache: list, plan: tuple) -> mx.array:
    """model(inputs, cache) for one eligible token, ``plan`` being what ``eligible`` returned: logits
    (b, 1, num_tokens)."""
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
    memory_in, moves = [], []  # moves: whether the gradient point moves to the new weights (a TTT boundary)
    for layer, state, completes in zip(model.layers, states, plan):
        move = False
        if state is None:
            memory_in.append([])
        elif not completes:
            memory_in.append(state.last_update)
        else:
            mem = layer.mem
            move = not mem.frozen and mem.ends_batch(state.seq_index // mem.chunk_size + 1, mem.batch_size)
            memory_in.append([state.grad_point, state.last_update, state.momentum or [], state.buffer,
                              mx.array([not mem.frozen]), mx.array([move])])
        moves.append(move)
    logits, new_keys, new_values, memory_out = _compiled(model, plan)(
        inputs, mx.array(start, dtype=mx.int32), keys, values, mx.array(key_pos), memory_in)
    for layer, c, k, v in zip(model.layers, attention, new_keys, new_values):
        layer.attn.remember(c, mx.concatenate([c.keys, k], axis=2), mx.concatenate([c.values, v], axis=2),
                            k_start, start + 1)
    for m, state, out, completes, move in zip(memory, states, memory_out, plan, moves):
        if state is None:
            continue
        if completes:
            state.last_update, momentum = list(out[0]), out[1]
            state.momentum = list(momentum) if momentum else None
            if move:
                state.grad_point = list(state.last_update)
            state.buffer = state.buffer[..., :0, :]
        else:
            state.buffer = mx.concatenate([state.buffer.astype(out.dtype), out], axis=-2)
        write_memory_state(m, state)
    return logits
