"""The dual form of the memory recurrences (memory_step._dual_store) against the loop form, chunk by chunk.

The loop form is the one the titans-pytorch fixtures pin down chunk by chunk; the dual form must give the same
outputs, final weights, momentum and outer gradients up to float32 rounding, for every structure it accepts.
"""

import mlx.core as mx
from mlx.utils import tree_flatten
import pytest

import titans_mlx.memory as memory_module
import titans_mlx.memory_step as ms
from titans_mlx.memory import NeuralMemory

CASES = {
    "default": dict(dim=32, chunk_size=4),
    "no_momentum": dict(dim=32, chunk_size=4, momentum=False),
    "heads": dict(dim=32, chunk_size=4, heads=2, dim_head=16),
    "linear": dict(dim=32, chunk_size=8, default_model_kwargs=dict(depth=1)),
    "no_residual_norm": dict(dim=32, chunk_size=4, mem_model_norm_add_residual=False),
    "lr_modulation": dict(dim=32, chunk_size=4, per_parameter_lr_modulation=True),
    "lookahead_ttt_batch": dict(dim=32, chunk_size=4, store_with_lookahead_value=True, batch_size=16),
    "deep": dict(dim=32, chunk_size=4, default_model_kwargs=dict(depth=3, expansion_factor=2.0)),
}


def _rel(a, b):
    return float(mx.max(mx.abs(a - b)).item() / mx.max(mx.abs(b)).item())


def _run(kw, x, dual, monkeypatch, grads=False):
    monkeypatch.setattr(ms, "DUAL_FORM", dual)
    monkeypatch.setattr(ms, "DUAL_TOKENS", 32)  # several sub-blocks per block
    memory_module._COMPILED.clear()  # DUAL_TOKENS is read when a block is traced, and is not in the cache's key
    mx.random.seed(0)
    mem = NeuralMemory(**kw)
    if not grads:
        y, state = mem(x)
        mx.eval(y, state.last_update)
        return y, state

    def loss(params):
        mem.update(params)
        y, state = mem(x)
        return mx.sum(y * mx.cos(mx.arange(y.size).reshape(y.shape))) + sum(mx.sum(w) for w in state.last_update)

    g = mx.grad(loss)(mem.trainable_parameters())
    mx.eval(g)
    return g


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("n", [37, 150])
def test_dual_form_equals_loop_form(name, n, monkeypatch):
    kw = CASES[name]
    # the lookahead/TTT-batch case is chaotic (a 1e-7 input change grows 2x every 8 tokens), so keep it short
    n = min(n, 40) if name == "lookahead_ttt_batch" else n
    x = mx.random.normal((2, n, kw["dim"]), key=mx.random.key(1))
    structure = NeuralMemory(**kw).structure
    assert ms.dual_form(structure, False, False, 4), "the case must take the dual form"
    y_dual, s_dual = _run(kw, x, True, monkeypatch)
    y_loop, s_loop = _run(kw, x, False, monkeypatch)
    assert _rel(y_dual, y_loop) < 1e-5
    for a, b in zip(s_dual.last_update, s_loop.last_update):
        assert _rel(a, b) < 1e-5
    if s_loop.momentum is not None:
        for a, b in zip(s_dual.momentum, s_loop.momentum):
            assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("name", ["default", "no_momentum", "lr_modulation"])
def test_dual_form_outer_gradients_equal_loop_form(name, monkeypatch):
    kw = CASES[name]
    x = mx.random.normal((1, 45, kw["dim"]), key=mx.random.key(2))
    g_dual = dict(tree_flatten(_run(kw, x, True, monkeypatch, grads=True)))
    g_loop = dict(tree_flatten(_run(kw, x, False, monkeypatch, grads=True)))
    assert g_dual.keys() == g_loop.keys()
    for k in g_loop:
        if mx.max(mx.abs(g_loop[k])).item() > 0:
            assert _rel(g_dual[k], g_loop[k]) < 1e-4, k


def test_dual_form_declines_what_it_cannot_express():
    base = NeuralMemory(dim=32, chunk_size=4).structure
    assert ms.dual_form(base, False, False, 2)
    assert not ms.dual_form(base, False, False, 1)  # one chunk: nothing to batch
    assert not ms.dual_form(base, True, False, 4)  # per-chunk weights wanted: the loop forms them anyway
    assert not ms.dual_form(base, False, True, 4)
    for kw in (dict(spectral_norm_surprises=True), dict(momentum_order=2), dict(chunk_size=32),
               dict(model=dict(**{"class": "MemoryAttention"}, dim=32))):
        structure = NeuralMemory(**{"dim": 32, "chunk_size": 4, **kw}).structure
        assert not ms.dual_form(structure, False, False, 4), kw


def test_frozen_and_padded_blocks(monkeypatch):
    # 41 tokens of chunk 4: a block of 10 chunks bucketed to 16 (six padding chunks), then frozen (no chunk valid)
    kw = CASES["default"]
    x = mx.random.normal((1, 41, 32), key=mx.random.key(3))
    for frozen in (False, True):
        outs = []
        for dual in (True, False):
            monkeypatch.setattr(ms, "DUAL_FORM", dual)
            mx.random.seed(0)
            mem = NeuralMemory(**kw)
            mem.frozen = frozen
            y, state = mem(x)
            outs.append((y, state))
        (y1, s1), (y2, s2) = outs
        assert _rel(y1, y2) < 1e-5
        for a, b in zip(s1.last_update, s2.last_update):
            assert _rel(a, b) < 1e-5 if not frozen else mx.array_equal(a, b)
