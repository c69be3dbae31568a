"""The cache as mlx-lm sees it (its classes, deep copies, nbytes, trimming, batching) and session files.

Expected values come from uninterrupted runs of the same model: a cache copied, saved or loaded must continue exactly
as one pass over the whole text.
"""

import copy
import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_lm_cache

from test_generate import PROMPT, make_model, model, run, tok  # noqa: F401 (model, tok: its fixtures)
from test_half_precision import cast
from titans_mlx.cache import check_cache, memory_states
from titans_mlx.session import GenerationError, GenerationState, load_state, save_state


def test_cache_is_made_of_mlx_lm_classes_that_the_server_serves_one_at_a_time(model):
    cache = mlx_lm_cache.make_prompt_cache(model)
    assert len(cache) == 2 * len(model.layers)
    assert all(type(c).__name__ in vars(mlx_lm_cache) and type(c).__module__ == mlx_lm_cache.__name__ for c in cache)
    assert all(c.empty() for c in cache) and sum(c.nbytes for c in cache) == 0
    # mlx_lm.server batches only when every entry has `merge` (ModelProvider._load); left padding would shift the
    # segment layout, so a Titans cache must not qualify
    assert not all(hasattr(c, "merge") for c in cache)
    # a memory cannot be un-written: mlx-lm must never trim it (prompt cache reuse, speculative decoding)
    assert not mlx_lm_cache.can_trim_prompt_cache(cache)
    assert mlx_lm_cache.trim_prompt_cache(cache, 1) == 0


def test_deep_copy_continues_like_the_original(model):
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (1, 61)), dtype=mx.int32)
    full = model(tokens)
    cache = model.make_cache()
    model(tokens[:, :37], cache=cache)
    assert sum(c.nbytes for c in cache) > 0 and not any(c.empty() for c in cache[1::2][1:])
    copied = copy.deepcopy(cache)  # what mlx-lm's LRUPromptCache hands out
    rest_copy = model(tokens[:, 37:], cache=copied)
    rest = model(tokens[:, 37:], cache=cache)
    np.testing.assert_allclose(np.array(rest_copy), np.array(full[:, 37:]), rtol=1e-5, atol=1e-5)
    assert mx.array_equal(rest_copy, rest)
    check_cache(model, cache)


def test_check_cache_refuses_what_does_not_fit(model):
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    with pytest.raises(ValueError, match="entries"):
        check_cache(model, cache[:-1])
    bad = copy.deepcopy(cache)
    bad[0].offset += 1
    with pytest.raises(ValueError, match="positions"):
        check_cache(model, bad)
    bad = copy.deepcopy(cache)
    bad[1], bad[3] = bad[3], bad[1]  # a layer without memory gets a memory's slots
    with pytest.raises(ValueError, match="arrays"):
        check_cache(model, bad)
    bad = copy.deepcopy(cache)
    bad[3].cache[0] = bad[3].cache[0][..., :1]  # the memory's buffer no longer fits the position
    with pytest.raises(ValueError, match="layer 2"):
        check_cache(model, bad)


def test_session_file_is_an_mlx_lm_prompt_cache(model, tok, tmp_path):
    state = GenerationState.new(model)
    run(model, tok, PROMPT, 3, state=state)
    path = tmp_path / "s.safetensors"
    save_state(path, state, model, tok, model_path="some/model")
    cache, metadata = mlx_lm_cache.load_prompt_cache(str(path), return_metadata=True)
    assert [type(c) for c in cache] == [type(c) for c in state.cache]
    assert metadata["model"] == "some/model" and json.loads(metadata["tokenizer_config"]) == {}
    assert int(metadata["titans_tokens"]) == len(PROMPT) + 3
    # mlx-lm's loaded cache continues as the session does
    nxt = mx.array([[ord("x")]])
    assert mx.array_equal(model(nxt, cache=cache), model(nxt, cache=copy.deepcopy(state.cache)))


def test_plain_mlx_lm_prompt_cache_loads_and_continues_with_a_prompt(model, tok, tmp_path):
    # what mlx_lm.cache_prompt writes: the cache alone, no logits; continuing it needs a prompt
    cache = model.make_cache()
    head, tail = PROMPT[:50], PROMPT[50:]
    model(mx.array([tok.encode(head)]), cache=cache)
    mlx_lm_cache.save_prompt_cache(str(tmp_path / "p.safetensors"), cache, {"model": "m", "tokenizer_config": "{}"})
    state = load_state(tmp_path / "p.safetensors", model, tok)
    assert state.logits is None and state.tokens == len(head)
    cont = [r.token for r in run(model, tok, tail, 6, state=state)]
    assert cont == [r.token for r in run(model, tok, PROMPT, 6)]
    with pytest.raises(GenerationError, match="empty"):
        run(model, tok, "", 2, state=load_state(tmp_path / "p.safetensors", model, tok))


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_a_flipped_byte_is_refused(model, tok, tmp_path):
    state = GenerationState.new(model)
    run(model, tok, PROMPT, 2, state=state)
    path = tmp_path / "s.safetensors"
    save_state(path, state, model, tok)
    data = bytearray(path.read_bytes())
    start = _data_offset(path)
    for where in (start, (start + len(data)) // 2, len(data) - 1):  # first, a middle and the last byte of the arrays
        damaged = bytearray(data)
        damaged[where] ^= 0x10
        (tmp_path / "d.safetensors").write_bytes(bytes(damaged))
        with pytest.raises(GenerationError, match="checksum"):
            load_state(tmp_path / "d.safetensors", model, tok)
    # the logits live in the metadata: damaging them is caught too
    header = json.loads(data[8:start])
    logits = header["__metadata__"]["0.titans_logits"]
    header["__metadata__"]["0.titans_logits"] = ("A" if logits[0] != "A" else "B") + logits[1:]
    raw = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[start:]))
    with pytest.raises(GenerationError, match="checksum"):
        load_state(tmp_path / "m.safetensors", model, tok)
    assert load_state(path, model, tok).tokens == state.tokens  # the undamaged file still loads


def test_first_format_is_refused_with_how_to_recreate(model, tok, tmp_path):
    mx.save_safetensors(str(tmp_path / "old.safetensors"), {"cache.0.keys": mx.zeros((1, 2, 3, 4))},
                        metadata={"format": "titans-mlx-state", "version": "1", "cache.num_layers": "1"})
    with pytest.raises(GenerationError, match="first format.*--save-state old.safetensors"):
        load_state(tmp_path / "old.safetensors", model, tok)


def test_session_of_a_model_of_another_shape_is_refused(model, tok, tmp_path):
    other = make_model(depth=3, neural_memory_layers=[2, 3])
    cache = other.make_cache()
    other(mx.array([tok.encode(PROMPT)]), cache=cache)
    mlx_lm_cache.save_prompt_cache(str(tmp_path / "o.safetensors"), cache, {"model": "m", "tokenizer_config": "{}"})
    with pytest.raises(GenerationError, match="does not fit this model"):
        load_state(tmp_path / "o.safetensors", model, tok)


def test_bfloat16_session_round_trips(tok, tmp_path):
    model = cast(make_model(), mx.bfloat16)
    state = GenerationState.new(model)
    first = [r.token for r in run(model, tok, PROMPT, 4, state=state)]
    save_state(tmp_path / "b.safetensors", state, model, tok)
    resumed = [r.token for r in run(model, tok, "", 4, state=load_state(tmp_path / "b.safetensors", model, tok))]
    assert first + resumed == [r.token for r in run(model, tok, PROMPT, 8)]
    assert all(s is None or s.last_update[0].dtype == mx.float32 for s in memory_states(state.cache))
