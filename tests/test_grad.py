"""Gradients through the memory: titans-pytorch's autograd (fixtures), finite differences, compile, train/eval mode.

Expected gradients come from the real titans-pytorch 0.5.5 in float64 (tests/fixtures/make_grad_fixtures.py); the
finite-difference checks use only our float64 forward (itself checked against titans-pytorch's logits).
"""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from safetensors import safe_open

from conftest import FIXTURES
from memory_cases import load_case, load_memory
from test_mac import CASES, load_fixture
from titans_mlx.cache import memory_states
from titans_mlx.mac import Model, ModelArgs
from titans_mlx.memory_models import gelu, gelu_grad

GRADS = FIXTURES / "grads"
MEMORY_CASES = sorted(p.stem[len("memory_"):] for p in GRADS.glob("memory_*.safetensors"))

def read_grads(path):
    """titans-pytorch's float64 gradients by its names, its float32 error per tensor, the loss and the zero floor."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        grads = {k[len("grad."):]: f.get_tensor(k) for k in f.keys()}
    return grads, json.loads(meta["torch_float32_error"]), float(meta["loss"]), float(meta["zero_floor"])


def assert_close(ours: dict, theirs: dict, torch32: dict, zero_floor: float, model_wide: bool = False):
    """Per tensor: <= 1e-4 relative, or within 3x of titans-pytorch's own float32 error where that is larger
    (hyper-connection scales, spectral-norm surprises); both measured against the same scale, max(|g|, floor), where
    the floor (a fraction of the model's largest gradient, from the fixture) marks gradients that are zero to float32
    precision, e.g. a softmax-pooling bias: exactly 0 in float64, ~1e-9 in float32.

    model_wide: titans-pytorch's float32 error is taken over the whole model (its worst tensor), not per tensor. For
    spectral-norm surprises on chunks narrower than the memory: Newton-Schulz amplifies rounding in the null space of
    the low-rank chunk updates ~500x, and where that amplified noise lands depends on the rounding pattern (GELU
    variants of ours, all about an ulp accurate, moved our worst tensor from 1.6x to 5.8x of torch's per-tensor error),
    so per tensor it compares two draws of the same noise."""
    floor = zero_floor * max(np.abs(g).max() for g in theirs.values())
    worst_torch = max(torch32.values())
    bad = {}
    for k, ref in theirs.items():
        err = np.abs(np.asarray(ours[k], np.float64) - ref).max() / max(np.abs(ref).max(), floor)
        if err > max(1e-4, 3 * (worst_torch if model_wide else torch32[k])):
            bad[k] = (err, torch32[k])
    assert not bad, "gradients differ from titans-pytorch's float64 ones (ours, titans-pytorch float32): " + ", ".join(
        f"{k}: {m:.2e} ({t:.2e})" for k, (m, t) in sorted(bad.items()))


def by_our_names(sanitize, grads: dict, errors: dict):
    named = {k: v for k, v in grads.items() if not k.startswith("input.")}
    inputs = {k: v.astype(np.float64) for k, v in grads.items() if k.startswith("input.")}
    ours = {k: np.asarray(v, np.float64) for k, v in sanitize({k: mx.array(v) for k, v in named.items()}).items()}
    err = {k: float(np.asarray(v)) for k, v in sanitize({k: mx.array(errors[k]) for k in named}).items()}
    return {**ours, **inputs}, {**err, **{k: errors[k] for k in inputs}}


@pytest.mark.parametrize("name", CASES)
def test_mac_gradients_match_titans_pytorch(name):
    model, arrays, _ = load_fixture(name)
    grads, errors, loss_ref, floor = read_grads(GRADS / f"mac_{name}.safetensors")
    theirs, torch32 = by_our_names(model.sanitize, grads, errors)
    loss, ours = nn.value_and_grad(model, lambda m, ids: m.loss(ids))(model, arrays["tokens"])
    ours = dict(tree_flatten(ours))
    # every trainable parameter gets a gradient from titans-pytorch, and nothing else is trained
    assert set(ours) == set(theirs)
    assert abs(loss.item() - loss_ref) <= 1e-5 * abs(loss_ref)
    spectral = model.args.neural_memory_kwargs.get("spectral_norm_surprises", False)
    assert_close(ours, theirs, torch32, floor, model_wide=spectral)


@pytest.mark.parametrize("name", MEMORY_CASES)
def test_neural_memory_gradients_match_titans_pytorch(name):
    case = load_case(name)
    mem = load_memory(case)
    grads, errors, loss_ref, floor = read_grads(GRADS / f"memory_{name}.safetensors")
    r = mx.array(grads.pop("input.r"))
    prev = case["prev"] or []

    def loss_fn(params, x, prev):
        mem.update(params)
        return mx.sum(mem(x, prev_weights=prev or None)[0] * r)

    params = mem.trainable_parameters()
    loss, (gp, gx, gprev) = mx.value_and_grad(loss_fn, argnums=(0, 1, 2))(params, case["x"], prev)
    mem.update(params)
    ours = {**dict(tree_flatten(gp)), "input.x": gx, **{f"input.prev.{i}": g for i, g in enumerate(gprev)}}
    theirs, torch32 = by_our_names(mem.sanitize, grads, errors)
    # what titans-pytorch gives no gradient (no path from the loss: nothing stored yet) must get zero here
    assert set(theirs) <= set(ours)
    for k in set(ours) - set(theirs):
        assert not np.any(np.asarray(ours[k])), k
        theirs[k], torch32[k] = np.zeros(ours[k].shape), 0.0
    assert abs(loss.item() - loss_ref) <= 1e-5 * max(abs(loss_ref), 1.0)
    assert_close(ours, theirs, torch32, floor, model_wide=case["config"].get("spectral_norm_surprises", False))


@pytest.mark.parametrize("overrides", [
    dict(num_residual_streams=1, neural_memory_layers=(1, 2), neural_memory_batch_size=20, sliding_window_attn=True,
         neural_memory_kwargs=dict(heads=2, dim_head=16, qk_rmsnorm=True, attn_pool_chunks=True)),
    dict(num_residual_streams=4, depth=3, neural_memory_layers=(1, 3), neural_mem_weight_residual=True,
         neural_memory_qkv_receives_diff_views=True, neural_memory_model={"class": "MemoryMLP", "dim": 32, "depth": 2}),
])
def test_live_gradients_against_titans_pytorch(overrides):
    """Fresh seeds and shapes where titans-pytorch is installed (the parity extra)."""
    pytest.importorskip("titans_pytorch")
    import sys

    import torch

    sys.path.insert(0, str(FIXTURES))
    import make_grad_fixtures as mg
    import make_mac_fixtures as mk

    torch.set_num_threads(1)
    config = mk.full_config(overrides)
    tmodel = mk.build_torch_model(config, seed=11).train()
    tokens = mk.make_tokens(config["num_tokens"], 2, 41, seed=12)
    loss_ref, g64, errors = mg.reference(mg.mac_run(tmodel, tokens))
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(mk.state_dict_numpy(tmodel)).items()), strict=True)
    grads = {k: v.numpy().astype(np.float32) for k, v in g64.items()}
    theirs, torch32 = by_our_names(model.sanitize, grads, errors)
    loss, ours = nn.value_and_grad(model, lambda m, ids: m.loss(ids))(model, mx.array(tokens.numpy()))
    ours = dict(tree_flatten(ours))
    assert set(ours) == set(theirs)
    assert abs(loss.item() - loss_ref) <= 1e-5 * abs(loss_ref)
    assert_close(ours, theirs, torch32, mg.ZERO_FLOOR)


# ---- finite differences: independent of both implementations' backward passes ---------------------------------------

FD_CONFIGS = {
    # default MemoryMLP (GELU, residual norm), momentum, two memory layers, block attention
    "mlp_memory": dict(num_tokens=32, dim=16, depth=2, segment_len=6, num_persist_mem_tokens=2,
                       num_longterm_mem_tokens=2, dim_head=8, heads=2, num_residual_streams=1,
                       neural_memory_layers=[1, 2], neural_memory_batch_size=16,
                       neural_memory_kwargs={"heads": 2, "dim_head": 8, "qk_rmsnorm": True,
                                             "per_parameter_lr_modulation": True, "attn_pool_chunks": True}),
    # weight residual + qkv views, sliding windows, lookahead values, gated transition
    "weight_residual_views": dict(num_tokens=32, dim=16, depth=2, segment_len=6, num_persist_mem_tokens=1,
                                  num_longterm_mem_tokens=1, dim_head=8, heads=2, num_residual_streams=1,
                                  sliding_window_attn=True, neural_mem_weight_residual=True,
                                  neural_memory_qkv_receives_diff_views=True, neural_memory_batch_size=14,
                                  neural_memory_kwargs={"store_with_lookahead_value": True, "gated_transition": True,
                                                        "default_step_transform_max_lr": 0.5}),
}


def _perturb(model, seed):
    # random non-constant parameters everywhere, so zero-initialised gains and biases matter
    rng = np.random.default_rng(seed)
    params = tree_map(lambda p: p + mx.array(0.2 * rng.standard_normal(p.shape).astype(np.float32)),
                      model.trainable_parameters())
    model.update(params)
    mx.eval(model.parameters())


@pytest.mark.parametrize("name", sorted(FD_CONFIGS))
def test_gradient_matches_finite_differences(name):
    mx.random.seed(3)
    model = Model(ModelArgs.from_dict(FD_CONFIGS[name]))
    _perturb(model, 4)
    ids = mx.array(np.random.default_rng(5).integers(0, 32, (2, 31)), dtype=mx.int32)
    _, grads = nn.value_and_grad(model, lambda m, ids: m.loss(ids))(model, ids)  # float32, as trained
    # a unit direction half along our gradient, half random: the slope there is large enough to measure, and a
    # wrong gradient component shows either way
    rng = np.random.default_rng(6)
    flat_grads = {k: np.array(g, np.float64) for k, g in tree_flatten(grads)}
    noise = {k: rng.standard_normal(g.shape) for k, g in flat_grads.items()}
    norm = lambda t: math.sqrt(sum(float(np.sum(v * v)) for v in t.values()))
    g_norm, n_norm = norm(flat_grads), norm(noise)
    flat_dir = {k: flat_grads[k] / g_norm + noise[k] / n_norm for k in flat_grads}
    d_norm = norm(flat_dir)
    flat_dir = {k: v / d_norm for k, v in flat_dir.items()}
    analytic = sum(float(np.sum(flat_grads[k] * flat_dir[k])) for k in flat_grads)
    direction = tree_unflatten([(k, mx.array(v, dtype=mx.float64)) for k, v in flat_dir.items()])

    base = model.trainable_parameters()
    model.set_dtype(mx.float64)
    base64 = model.trainable_parameters()
    h = 1e-3

    def loss_at(t):
        model.update(tree_map(lambda d, p: p + t * d, direction, base64))
        return model.loss(ids).item()

    # MLX's float64 exp/erf/norms on the CPU are only float32-accurate (~1e-7 relative), so the step is large and
    # Richardson extrapolation removes the O(h^2) term of the central difference
    numeric = (8 * (loss_at(h) - loss_at(-h)) - (loss_at(2 * h) - loss_at(-2 * h))) / (12 * h)
    model.update(base)
    assert abs(analytic - numeric) <= 1e-4 * abs(numeric), (analytic, numeric)


def test_gelu_derivatives_match_closed_forms():
    # the float32 fast path's derivatives (custom vjps) against GELU's first and second derivatives in double
    # precision from Python's math module: Phi(z) + z phi(z) and phi(z) (2 - z^2)
    zs = np.linspace(-6.0, 6.0, 241)
    phi = np.array([math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) for z in zs])
    cdf = np.array([0.5 * (1 + math.erf(z / math.sqrt(2))) for z in zs])
    z = mx.array(zs.astype(np.float32))
    first = mx.grad(lambda t: mx.sum(gelu(t)))(z)
    second = mx.grad(lambda t: mx.sum(gelu_grad(t)))(z)
    np.testing.assert_allclose(np.array(gelu_grad(z)), cdf + zs * phi, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(first), cdf + zs * phi, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(second), phi * (2 - zs * zs), rtol=0, atol=1e-6)


# ---- the training step: compiled, mode-independent, checkpointed ---------------------------------------------------


def small_model(**overrides):
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict({**FD_CONFIGS["mlp_memory"], **overrides}))
    _perturb(model, 1)
    return model


def test_compiled_training_step_equals_eager():
    ids = mx.array(np.random.default_rng(0).integers(0, 32, (2, 40)), dtype=mx.int32)

    def run(compiled):
        model = small_model()
        opt = optim.AdamW(learning_rate=1e-2)
        loss_and_grad = nn.value_and_grad(model, lambda m, ids: m.loss(ids))

        def step(ids):
            loss, grads = loss_and_grad(model, ids)
            opt.update(model, grads)
            return loss

        if compiled:  # as mlx-lm's trainer compiles its step: fails on mx.eval, .item() or hidden module state
            state = [model.state, opt.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
        losses = []
        for _ in range(3):
            losses.append(step(ids))
            mx.eval(model.state, opt.state)
        return [x.item() for x in losses], dict(tree_flatten(model.parameters()))

    eager_losses, eager = run(False)
    compiled_losses, compiled = run(True)
    assert np.allclose(eager_losses, compiled_losses, rtol=1e-5)
    assert eager_losses[2] < eager_losses[0]  # it trains
    for k in eager:
        np.testing.assert_allclose(np.array(compiled[k]), np.array(eager[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_forward_never_evaluates(monkeypatch):
    # a long input spans several of the memory's processing blocks; the forward must leave evaluation to its caller
    model = small_model(neural_memory_segment_len=2, neural_memory_batch_size=None)
    ids = mx.array(np.random.default_rng(1).integers(0, 32, (1, 400)), dtype=mx.int32)
    assert model.layers[0].mem.block_tokens(1) < 400 + 400 // 6 * 2

    def refuse(*args, **kwargs):
        raise AssertionError("the forward called mx.eval")

    monkeypatch.setattr(mx, "eval", refuse)
    monkeypatch.setattr(mx, "async_eval", refuse)
    loss, grads = nn.value_and_grad(model, lambda m, ids: m.loss(ids))(model, ids)
    monkeypatch.undo()
    mx.eval(loss, grads)
    assert np.isfinite(loss.item())


def test_memory_writes_in_eval_mode():
    # mlx-lm's loaders call model.eval(); a Titans model must keep learning at test time
    model = small_model()
    ids = mx.array(np.random.default_rng(2).integers(0, 32, (1, 40)), dtype=mx.int32)
    model.train()
    train_logits, train_cache = model(ids), model.make_cache()
    model(ids, cache=train_cache)
    model.eval()
    eval_cache = model.make_cache()
    eval_logits = model(ids)
    model(ids, cache=eval_cache)
    assert mx.array_equal(train_logits, eval_logits)
    state, initial = memory_states(eval_cache)[0], model.layers[0].mem.initial_state(1)
    assert state.seq_index > 0
    assert float(mx.max(mx.abs(state.last_update[1] - initial.last_update[1]))) > 1e-3


def test_layer_checkpointing_gives_the_same_gradients():
    ids = mx.array(np.random.default_rng(3).integers(0, 32, (2, 40)), dtype=mx.int32)
    model = small_model()
    loss_and_grad = nn.value_and_grad(model, lambda m, ids: m.loss(ids))
    loss, plain = loss_and_grad(model, ids)
    model.checkpoint_layers = True
    loss_ck, checkpointed = loss_and_grad(model, ids)
    assert loss.item() == pytest.approx(loss_ck.item(), rel=1e-6)
    checkpointed = dict(tree_flatten(checkpointed))
    for k, g in tree_flatten(plain):
        np.testing.assert_allclose(np.array(checkpointed[k]), np.array(g), rtol=1e-5, atol=1e-7, err_msg=k)
