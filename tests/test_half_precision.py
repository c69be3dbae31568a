"""Half-precision models: the neural memory keeps its fast weights and does its arithmetic in float32.

The expectation is the float32 memory itself, fed the half-precision model's rounded weights and inputs: a half model's
memory must produce exactly what it produces.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from memory_cases import load_case, load_memory
from test_mac import load_fixture
from titans_mlx.cache import memory_states


def cast(module, dtype):
    """As `python -m convert --dtype` does: every floating weight the module's cast_predicate allows."""
    module.load_weights([(k, v.astype(dtype) if module.cast_predicate(k) else v)
                         for k, v in tree_flatten(module.parameters())])
    return module


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("name", ["default", "train_mac_like", "gated_transition"])
def test_half_memory_computes_in_float32(name, dtype):
    case = load_case(name)
    half = cast(load_memory(case), dtype)
    assert half.memory_model_parameters[0].dtype == mx.float32  # the initial fast weights are not cast
    # the float32 memory with the half model's (rounded) weights, on the same rounded input
    rounded = load_memory(case)
    rounded.load_weights([(k, v.astype(mx.float32)) for k, v in tree_flatten(half.parameters())])
    x = case["x"].astype(dtype)
    prev = case["prev"]
    y, state = half(x, prev_weights=prev)[:2]
    y32, state32 = rounded(x.astype(mx.float32), prev_weights=prev)[:2]
    assert y.dtype == dtype
    assert mx.array_equal(y, y32.astype(dtype))
    for a, b in zip(state.last_update, state32.last_update):
        assert a.dtype == mx.float32 and mx.array_equal(a, b)


def test_half_mac_keeps_a_float32_memory_state():
    model, arrays, _ = load_fixture("sliding_s1_ttt_heads")
    cast(model, mx.bfloat16)
    cache = model.make_cache()
    logits = model(arrays["tokens"], cache=cache)
    assert logits.dtype == mx.bfloat16 and np.isfinite(np.array(logits.astype(mx.float32))).all()
    states = [s for s in memory_states(cache) if s is not None]
    assert states and all(w.dtype == mx.float32 for s in states for w in s.last_update + s.grad_point)
    assert not any("memory_model_parameters" in k and v.dtype != mx.float32
                   for k, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_rms_norm_keeps_float32_epsilon_in_half_precision(dtype):
    # a small-magnitude input (mean square 1e-4, against bfloat16's eps 2^-7) normalises as the float32 model does
    from titans_mlx.attention import RMSNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 64)) * 0.01).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    norm = RMSNorm(64)
    norm.weight = mx.array(w).astype(dtype)
    xh = np.array(mx.array(x).astype(dtype).astype(mx.float32), dtype=np.float64)
    wh = np.array(norm.weight.astype(mx.float32), dtype=np.float64)
    expected = xh / np.sqrt((xh ** 2).mean(-1, keepdims=True) + np.finfo(np.float32).eps) * wh
    got = np.array(norm(mx.array(xh.astype(np.float32)).astype(dtype)).astype(mx.float32))
    assert np.abs(got - expected).max() <= 2 * float(mx.finfo(dtype).eps) * np.abs(expected).max()
    with_dtype_eps = xh / np.sqrt((xh ** 2).mean(-1, keepdims=True) + float(mx.finfo(dtype).eps)) * wh
    assert np.abs(with_dtype_eps - expected).max() > 0.5 * np.abs(expected).max()  # what torch's eps would do

