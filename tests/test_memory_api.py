"""NeuralMemory internals and API: closed-form gradients, compile reuse, checkpoint names, bad input."""

import mlx.core as mx
import numpy as np
import pytest

from memory_cases import load_case, load_memory, rel_err
from titans_mlx import memory as memory_module
from titans_mlx.memory import NeuralMemory
from titans_mlx.memory_models import MemoryMLP, ResidualNorm
from titans_mlx.memory_step import autodiff_grads, mlp_store_grads


@pytest.mark.parametrize("per_chunk", [True, False])  # one gradient point per chunk (weight residual) or shared
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_closed_form_gradients_match_autodiff(residual, depth, per_chunk):
    mx.random.seed(depth)
    model = MemoryMLP(8, depth, 2.0)
    model = ResidualNorm(model) if residual else model
    mem = NeuralMemory(dim=8, chunk_size=4, model=model.model if residual else model,
                       mem_model_norm_add_residual=residual)
    bh, k, c = 3, 5, 4
    params = [mx.random.normal((bh,) + ((k,) if per_chunk else ()) + s) * 0.5 for s in model.shapes()]
    keys, values = mx.random.normal((bh, k, c, 8)), mx.random.normal((bh, k, c, 8))
    lr = mx.random.uniform(shape=(bh, k, c))
    g1, l1 = mlp_store_grads(model, params, keys, values, lr)
    g2, l2 = autodiff_grads(mem.structure, params, keys, values, lr)
    assert rel_err(l1, l2) <= 1e-6
    for a, b in zip(g1, g2):
        assert a.shape == b.shape == (bh, k) + a.shape[2:]
        assert rel_err(a, b) <= 1e-5


def test_new_lengths_and_hyperparameters_reuse_the_compiled_step():
    x = mx.random.normal((1, 300, 16))
    mem = NeuralMemory(dim=16, chunk_size=4, default_step_transform_max_lr=0.5)
    assert mem._block_chunks(1) == 64
    for n in (4, 8, 16, 32, 64, 128, 256):  # one call per block-size bucket: 1, 2, 4, ... 64 chunks
        mx.eval(mem(x[:, :n])[0])
    traces = memory_module.TRACE_COUNT["store_block"]
    other = NeuralMemory(dim=16, chunk_size=4, default_step_transform_max_lr=0.1)  # same shapes, new value
    for n in (5, 13, 27, 50, 101, 199, 299):
        mx.eval(mem(x[:, :n])[0], other(x[:, :n])[0])
    assert memory_module.TRACE_COUNT["store_block"] == traces


def test_compiled_equals_eager():
    case = load_case("train_mac_like")
    mem = load_memory(case)
    y, _ = mem(case["x"], prev_weights=case["prev"])
    mx.disable_compile()
    try:
        y_eager, _ = mem(case["x"], prev_weights=case["prev"])
    finally:
        mx.enable_compile()
    assert rel_err(y, y_eager) <= 1e-6


def test_long_input_goes_through_in_blocks(monkeypatch):
    # a block holds few chunks: a long input crosses many blocks and still equals titans-pytorch
    monkeypatch.setattr(memory_module, "MAX_BLOCK_CHUNKS", 2)
    case = load_case("ttt_batch")
    y, _ = load_memory(case)(case["x"])
    assert rel_err(y, case["y"]) <= 1e-5


def test_sanitize_is_idempotent_and_drops_templates():
    case = load_case("silu_two_kv")
    mem = NeuralMemory(**case["config"])
    once = mem.sanitize(case["sd"])
    assert not any(k.startswith("memory_model.") for k in once)
    assert "to_keys.weight" in once and "to_adaptive_step.weight" in once
    assert mem.sanitize(once).keys() == once.keys()
    mem.load_weights(list(once.items()), strict=True)
    with pytest.raises(ValueError):
        mem.load_weights(list(once.items())[1:], strict=True)


def test_init_biases():
    mem = NeuralMemory(dim=8, chunk_size=2, init_adaptive_step_bias=-3.0, init_momentum_bias=2.0, init_decay_bias=1.0)
    assert np.all(np.array(mem.to_adaptive_step.weight) == 0) and np.all(np.array(mem.to_adaptive_step.bias) == -3)
    assert np.all(np.array(mem.to_momentum.bias) == 2) and np.all(np.array(mem.to_decay_factor.bias) == 1)


def test_bad_input_names_the_problem():
    mem = NeuralMemory(dim=8, chunk_size=4)
    with pytest.raises(ValueError, match="shape"):
        mem(mx.zeros((1, 2, 3, 8)))
    with pytest.raises(ValueError, match="dim=8"):
        mem(mx.zeros((1, 5, 7)))
    with pytest.raises(ValueError, match="floating"):
        mem(mx.zeros((1, 5, 8), dtype=mx.int32))
    with pytest.raises(ValueError, match="mx.array"):
        mem(np.zeros((1, 5, 8)))
    _, state = mem(mx.zeros((2, 5, 8)))
    with pytest.raises(ValueError, match="does not fit"):
        mem(mx.zeros((1, 5, 8)), state=state)  # another batch size
    other = NeuralMemory(dim=8, chunk_size=4, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="does not fit"):
        other(mx.zeros((2, 5, 8)), state=state)  # another configuration
    residual = NeuralMemory(dim=8, chunk_size=4, accept_weight_residual=True)
    with pytest.raises(ValueError, match="prev_weights"):
        residual(mx.zeros((1, 5, 8)))
    with pytest.raises(ValueError, match="prev_weights must be 3 arrays"):
        residual(mx.zeros((1, 9, 8)), prev_weights=[mx.zeros((1, 1, 8))] * 3)  # 2 chunks need 2 entries
    with pytest.raises(NotImplementedError, match="chunk_size"):
        NeuralMemory(dim=8, chunk_size=(2, 4))
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        NeuralMemory(dim=8, chunk_size=4, batch_size=6)


def test_gelu_and_its_derivative_match_the_exact_erf():
    import math

    from titans_mlx.memory_models import gelu, gelu_grad

    z = np.linspace(-9, 9, 20001)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in z])
    exact_grad = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                           for v in z])
    zz = mx.array(z.astype(np.float32))
    assert np.all(np.abs(np.array(gelu(zz)) - exact) <= 3e-7 * np.maximum(1, np.abs(z)))
    assert np.abs(np.array(gelu_grad(zz)) - exact_grad).max() <= 1e-6
