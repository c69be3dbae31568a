"""titans_mlx.memory_frozen: test-time learning off; the memories read their current weights and write nothing.

Expected values come from reading the memory directly (memory_step.retrieve with the state's weights), not from the
store path under test.
"""

import mlx.core as mx
import numpy as np
import pytest

from memory_cases import load_case, load_memory, rel_err
from test_mac import load_fixture
from titans_mlx import memory_frozen
from titans_mlx.cache import memory_states
from titans_mlx.memory_step import retrieve


def _params(mem):
    return {k: v for k, v in mem.parameters().items() if k not in ("memory_model_parameters", "transition_gate")}


@pytest.mark.parametrize("name", ["default", "heads", "ttt_batch", "train_mac_like", "gated_transition", "lookahead"])
def test_frozen_memory_reads_its_weights_and_keeps_them(name):
    case = load_case(name)
    mem = load_memory(case)
    x, prev = case["x"], case["prev"]
    # learn from the first 13 tokens, then read the rest frozen
    views = x.ndim == 4
    first, rest = (x[:, :, :13], x[:, :, 13:]) if views else (x[:, :13], x[:, 13:])
    prev_first = None if prev is None else [p[:, : 13 // mem.chunk_size + 1] for p in prev]
    _, state = mem(first, prev_weights=prev_first)[:2]
    with memory_frozen(mem):
        assert mem.frozen
        y, after = mem(rest, state=state, prev_weights=prev)[:2]
    assert not mem.frozen
    queries = rest[0] if views else rest
    expected = retrieve(mem.structure, _params(mem), state.last_update, queries)
    assert rel_err(y, expected) <= 1e-6
    for group in ("last_update", "grad_point", "momentum"):
        for a, b in zip(getattr(after, group) or [], getattr(state, group) or []):
            assert mx.array_equal(a, b), group
    n = state.seq_index + state.buffer.shape[-2] + queries.shape[1]
    assert after.seq_index == n // mem.chunk_size * mem.chunk_size  # the sequence still advances


def test_frozen_any_split_equals_one_call():
    case = load_case("ttt_batch")
    mem = load_memory(case)
    x = case["x"]
    with memory_frozen(mem):
        whole, _ = mem(x)
        pieces, state = [], None
        for a, b in [(0, 1), (1, 6), (6, 7), (7, 22), (22, x.shape[1])]:
            y, state = mem(x[:, a:b], state=state)
            pieces.append(y)
    assert rel_err(mx.concatenate(pieces, axis=1), whole) <= 1e-6


def test_memory_frozen_restores_on_error_and_changes_a_mac():
    model, arrays, _ = load_fixture("sliding_s1_ttt_heads")
    tokens = arrays["tokens"]
    learning = model(tokens)
    with pytest.raises(RuntimeError):
        with memory_frozen(model):
            raise RuntimeError("inside")
    assert not any(layer.mem.frozen for layer in model.layers if layer.has_memory)
    cache = model.make_cache()
    with memory_frozen(model):
        frozen = model(tokens, cache=cache)
    assert float(mx.max(mx.abs(frozen - learning))) > 1e-3  # the memory's writes mattered, and were off
    for layer, state in zip(model.layers, memory_states(cache)):
        if layer.has_memory:
            initial = layer.mem.initial_state(tokens.shape[0])
            for a, b in zip(state.last_update, initial.last_update):
                assert mx.array_equal(a, b)
    assert mx.array_equal(model(tokens), learning)  # writes again after the block
