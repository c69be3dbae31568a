"""The compiled single-token decode step (titans_mlx/decode.py): the same logits as the general path and as
titans-pytorch's one-call forward, traced once however long the text, and taken by every token that can take it."""

import mlx.core as mx
import numpy as np
import pytest

from test_mac import CASES, load_fixture, rel_err
from titans_mlx import decode, memory_step


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
    monkeypatch.setattr(decode, "step", lambda *a: taken.append(1) or real_step(*a))
    compiled = _token_by_token(model, tokens, 3)
    tokenwise = all(layer.mem.memory_model.tokenwise for layer in model.layers if layer.has_memory)
    assert (len(taken) > tokens.shape[1] // 2) == tokenwise  # most tokens take it, unless the memory reads across
    model.compile_decode = False
    general = _token_by_token(model, tokens, 3)
    assert rel_err(compiled, reference) <= tol and rel_err(compiled, general) <= 1e-5


def test_the_step_is_traced_once_however_long_the_text():
    model, arrays, _ = load_fixture("sliding_s4_gate")
    tokens = mx.array(np.random.default_rng(0).integers(0, model.args.num_tokens, (1, 400)), dtype=mx.int32)
    before = decode.TRACES["token_step"]
    _token_by_token(model, tokens, 1)
    assert decode.TRACES["token_step"] == before + 1
