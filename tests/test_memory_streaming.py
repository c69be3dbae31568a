"""Streaming, causality and state: any split of a sequence gives titans-pytorch's one-call output."""

import random

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from memory_cases import load_case, load_memory, rel_err
from titans_mlx.cache import make_layer_cache, read_memory_state, write_memory_state
from titans_mlx.memory import MemoryState

TOL = 1e-5
STREAM_CASES = ["default", "heads", "ttt_batch", "gated_transition", "attention", "diff_views", "train_mac_like",
                "silu_two_kv", "momentum_order2_combine", "lookahead"]


def run_split(mem, case, sizes, state=None, roundtrip=None):
    """Feed the fixture input in consecutive calls of the given sizes; returns outputs and final state."""
    x, prev = case["x"], case["prev"]
    n = x.shape[-2]
    outs, pos = [], 0
    for size in list(sizes) + [n - sum(sizes)]:
        part = x[..., pos:pos + size, :]
        pw = None
        if prev is not None:  # the previous layer's weights before each chunk this call completes
            first = (state.seq_index if state else 0) // mem.chunk_size
            pw = [w[:, first:] for w in prev]
        y, state = mem(part, state=state, prev_weights=pw)
        if roundtrip:
            state = roundtrip(state)
        outs.append(y)
        pos += size
    return mx.concatenate(outs, axis=1), state


def random_splits(rng, n, max_parts=6):
    cuts = sorted(rng.sample(range(n + 1), rng.randint(0, max_parts)))
    sizes, last = [], 0
    for c in cuts:
        sizes.append(c - last)  # may be 0: an empty call
        last = c
    return sizes


@pytest.mark.parametrize("name", STREAM_CASES)
def test_any_split_equals_one_call(name):
    case = load_case(name)
    mem = load_memory(case)
    n = case["x"].shape[-2]
    rng = random.Random(name)
    splits = [[1] * (n - 1), [0, 3, 0], [mem.chunk_size + 1], [5, 2, 9, 1]] + [random_splits(rng, n) for _ in range(4)]
    for sizes in splits:
        y, state = run_split(mem, case, sizes)
        assert rel_err(y, case["y"]) <= TOL, sizes
        for ours, theirs in zip(state.last_update, case["last_update"]):
            assert rel_err(ours, theirs) <= TOL, sizes


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=6))
def test_hypothesis_splits(sizes):
    case = load_case("ttt_batch")
    n = case["x"].shape[-2]
    while sum(sizes) > n:
        sizes.pop()
    y, _ = run_split(load_memory(case), case, sizes)
    assert rel_err(y, case["y"]) <= TOL


def test_state_round_trips_through_an_mlx_lm_prompt_cache_file(tmp_path):
    # the state as a model's cache holds it (an mlx-lm ArraysCache), saved and rebuilt by mlx-lm's own functions
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    case = load_case("attention")  # the attention memory also carries its read window
    mem = load_memory(case)
    path = str(tmp_path / "state.safetensors")

    def roundtrip(state):
        entry = make_layer_cache(1, len(mem.memory_model_parameters))[1]
        write_memory_state(entry, state)
        save_prompt_cache(path, [entry])
        (loaded,) = load_prompt_cache(path)
        return read_memory_state(loaded, state.seq_index + state.buffer.shape[-2])

    y, state = run_split(mem, case, [3, 9, 10], roundtrip=roundtrip)
    assert rel_err(y, case["y"]) <= TOL
    assert state.seq_index == case["x"].shape[-2] // mem.chunk_size * mem.chunk_size


def test_causal():
    case = load_case("heads")
    mem = load_memory(case)
    x = case["x"]
    y, _ = mem(x)
    for j in (0, 5, 11, 30):
        x2 = mx.concatenate([x[:, :j], x[:, j:j + 1] + 1.0, x[:, j + 1:]], axis=1)
        y2, _ = mem(x2)
        assert np.array_equal(np.array(y2[:, :j]), np.array(y[:, :j])), j
        assert not np.allclose(np.array(y2[:, j:]), np.array(y[:, j:]))  # the change is seen from j on


def test_momentum_and_surprises_stream():
    case = load_case("surprises")
    mem = load_memory(case)
    x = case["x"]
    _, state, (loss_a, lr_a) = mem(x[:, :10], return_surprises=True)
    _, _, (loss_b, lr_b) = mem(x[:, 10:], state=state, return_surprises=True)
    assert rel_err(mx.concatenate([loss_a, loss_b], -1), case["surprise_loss"]) <= TOL
    assert rel_err(mx.concatenate([lr_a, lr_b], -1), case["surprise_lr"]) <= TOL
