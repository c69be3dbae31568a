"""The compiled single-token decode step (titans_mlx/decode.py): the same logits as the general path and as
titans-pytorch's one-call forward, traced once however long the text, and taken by every token that can take it."""

import contextlib

import mlx.core as mx
import numpy as np
import pytest

from test_mac import CASES, load_fixture, rel_err
from titans_mlx import decode, memory_frozen, memory_step
from titans_mlx.mac import Model, ModelArgs


def _token_by_token(model, tokens, first):
    cache = model.make_cache()
    out = [model(tokens[:, :first], cache=cache)]
    for i in range(first, tokens.shape[1]):
        out.append(model(tokens[:, i:i + 1], cache=cache))
        mx.eval(out[-1], [c.state for c in cache])
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dual", [False, True])
def test_compiled_step_equals_the_one_call_forward(name, dual, monkeypatch):
    # decoding stores in the loop form; a one-call forward in the dual form crosses forms (see test_mac's any-split)
    monkeypatch.setattr(memory_step, "DUAL_FORM", dual)
    tol = 1e-4 if dual else 1e-5
    model, arrays, _ = load_fixture(name)
    tokens = mx.concatenate([arrays["tokens"]] * 2, axis=1)
    reference = model(tokens)  # titans-pytorch's parallel forward, as test_mac checks
    taken = []
    real_step = decode.step
    monkeypatch.setattr(decode, "step", lambda *a: taken.append(a[-1]) or real_step(*a))
    compiled = _token_by_token(model, tokens, 3)
    memories = [layer.mem for layer in model.layers if layer.has_memory]
    tokenwise = all(mem.memory_model.tokenwise for mem in memories)
    assert (len(taken) > tokens.shape[1] // 2) == tokenwise  # most tokens take it, unless the memory reads across
    if memories and tokenwise and not any(mem.structure.weight_residual for mem in memories):
        # every token but those after a segment (long-term tokens first) takes a compiled step, chunk ends included
        n, S = tokens.shape[1] - 3, model.args.segment_len
        assert len(taken) >= n - (-(-tokens.shape[1] // S))
    model.compile_decode = False
    general = _token_by_token(model, tokens, 3)
    assert rel_err(compiled, reference) <= tol and rel_err(compiled, general) <= 1e-5


# memory chunks shorter than the attention window (10 positions), so that most chunks complete at tokens the
# compiled store step takes (in the fixtures a chunk is the window and completes with the long-term tokens)
SHORT_CHUNKS = {
    "ttt_momentum": dict(neural_memory_segment_len=4, neural_memory_batch_size=8),
    "views_no_momentum": dict(neural_memory_segment_len=3, neural_memory_qkv_receives_diff_views=True,
                              neural_memory_kwargs={"momentum": False, "qk_rmsnorm": True}),
    "weight_residual_spectral": dict(neural_memory_segment_len=4, neural_memory_batch_size=8,
                                     neural_mem_weight_residual=True,
                                     neural_memory_kwargs={"spectral_norm_surprises": True}),
    "lookahead_streams": dict(neural_memory_segment_len=5, num_residual_streams=2,
                              neural_memory_kwargs={"store_with_lookahead_value": True, "qk_rmsnorm": True}),
}


def _short_chunk_model(name, seed=0):
    config = dict(num_tokens=64, dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
                  neural_memory_layers=[1, 2], dim_head=16, heads=2, sliding_window_attn=True, **SHORT_CHUNKS[name])
    config["neural_memory_kwargs"] = dict(config.get("neural_memory_kwargs", {}), init_adaptive_step_bias=-1.0)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", list(SHORT_CHUNKS))
@pytest.mark.parametrize("frozen", [False, True])
def test_compiled_store_step_equals_the_general_path(name, frozen, monkeypatch):
    # the general path (Model.__call__, checked against titans-pytorch by test_mac) is the reference here
    monkeypatch.setattr(memory_step, "DUAL_FORM", False)
    model = _short_chunk_model(name)
    tokens = mx.array(np.random.default_rng(1).integers(0, 64, (2, 150)), dtype=mx.int32)
    plans = []
    real_step = decode.step
    monkeypatch.setattr(decode, "step", lambda *a: plans.append(a[-1]) or real_step(*a))
    with memory_frozen(model) if frozen else contextlib.nullcontext():
        reference = model(tokens)
        compiled = _token_by_token(model, tokens, 3)
        model.compile_decode = False
        general = _token_by_token(model, tokens, 3)
    stores = sum(any(plan) for plan in plans)
    chunk = model.layers[0].mem.chunk_size
    # chunks that complete at the long-term tokens (at most every other one here) take the general path
    assert stores >= 150 / chunk / 2
    assert rel_err(compiled, general) <= 1e-5 and rel_err(compiled, reference) <= 1e-5


def test_the_steps_are_traced_once_however_long_the_text():
    model = _short_chunk_model("ttt_momentum")
    tokens = mx.array(np.random.default_rng(0).integers(0, model.args.num_tokens, (1, 400)), dtype=mx.int32)
    before = dict(decode.TRACES)
    _token_by_token(model, tokens, 1)
    # the reading step and the storing step (the token that completes a memory chunk), once each
    assert decode.TRACES == {"token_step": before["token_step"] + 1, "store_step": before["store_step"] + 1}
