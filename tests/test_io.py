"""titans_mlx.io: model directories (config.json, sharded safetensors, tokenizer), written atomically, loaded strictly."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from titans_mlx import io as tio
from titans_mlx.tokenizer import ByteTokenizer


class Tiny(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.layers = [nn.Linear(dim, dim) for _ in range(depth)]
        self.norm = nn.RMSNorm(dim)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def sanitize(self, weights):
        return {k.replace("blocks.", "layers."): v for k, v in weights.items()}


@pytest.fixture
def tiny_type(monkeypatch):
    kind = tio.ModelType(
        build=lambda c: Tiny(c["dim"], c.get("depth", 2)),
        complete=lambda c: {"depth": 2, **c},
    )
    monkeypatch.setitem(tio.MODEL_TYPES, "tiny_test", kind)
    return {"model_type": "tiny_test", "dim": 8}


def outputs(model):
    return np.array(model(mx.arange(16, dtype=mx.float32).reshape(2, 8) / 10))


def test_roundtrip(tmp_path, tiny_type):
    model = Tiny(8, 2)
    out = tio.save_model(tmp_path / "m", model, tiny_type, ByteTokenizer())
    # a model type mlx-lm has no use for gets no model_file (see test_mac_dir_loads_in_mlx_lm)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    text = (out / "config.json").read_text()
    assert json.loads(text) == {"depth": 2, "dim": 8, "model_type": "tiny_test"}
    assert text.index('"depth"') < text.index('"dim"') < text.index('"model_type"')  # sorted
    _, meta = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert meta == {"format": "mlx"}
    loaded, tok = tio.load(out)
    assert isinstance(tok, ByteTokenizer) and not loaded.training
    np.testing.assert_array_equal(outputs(loaded), outputs(model))
    assert not list(tmp_path.glob(".m.*"))  # no temp dirs left


def test_sharded(tmp_path, tiny_type):
    model = Tiny(8, 3)
    config = {**tiny_type, "depth": 3}
    out = tio.save_model(tmp_path / "m", model, config, max_shard_bytes=300)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / tio.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_parameters"] == 3 * (64 + 8) + 8
    loaded, _ = tio.load(out)
    np.testing.assert_array_equal(outputs(loaded), outputs(model))
    (out / shards[1]).unlink()
    with pytest.raises(ValueError, match=f"shard {shards[1]} .* is missing"):
        tio.load(out)


def rewrite_weights(path, change):
    weights = dict(mx.load(str(path / "model.safetensors")))
    change(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_strict(tmp_path, tiny_type):
    out = tio.save_model(tmp_path / "m", Tiny(8, 2), tiny_type)
    rewrite_weights(out, lambda w: w.pop("layers.1.bias"))
    with pytest.raises(ValueError, match=r"lacks weight layers\.1\.bias"):
        tio.load(out)
    rewrite_weights(out, lambda w: w.update({"layers.1.bias": mx.zeros(8), "extra.weight": mx.zeros(2)}))
    with pytest.raises(ValueError, match=r"has weight extra\.weight .*does not create"):
        tio.load(out)
    rewrite_weights(out, lambda w: (w.pop("extra.weight"), w.update({"norm.weight": mx.zeros(9)})))
    with pytest.raises(ValueError, match=r"norm\.weight: .* shape \(9,\), the config gives \(8,\)"):
        tio.load(out)
    rewrite_weights(out, lambda w: w.update({"blocks.0.weight": w.pop("layers.0.weight"), "norm.weight": mx.ones(8)}))
    tio.load(out)  # sanitize runs on load


def test_overwrite_rules(tmp_path, tiny_type):
    out = tio.save_model(tmp_path / "m", Tiny(8, 2), tiny_type)
    with pytest.raises(FileExistsError, match="already exists"):
        tio.save_model(out, Tiny(8, 2), tiny_type)
    model = Tiny(8, 2)
    tio.save_model(out, model, tiny_type, overwrite=True)
    np.testing.assert_array_equal(outputs(tio.load(out)[0]), outputs(model))
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model directory"):
        tio.save_model(precious, model, tiny_type, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "m"]


def test_bad_directories(tmp_path, tiny_type):
    with pytest.raises(ValueError, match="not a model directory"):
        tio.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        tio.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        tio.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_type))
    with pytest.raises(ValueError, match="no model.*safetensors"):
        tio.load(tmp_path)


def test_save_refuses_float64_weights_with_one_line(tmp_path):
    from titans_mlx.mac import Model, ModelArgs

    config = dict(num_tokens=16, dim=16, depth=1, segment_len=4, dim_head=8, heads=2, num_residual_streams=1,
                  neural_memory_layers=[], model_type="titans_mac")
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.float64)
    with pytest.raises(ValueError, match="float64"):
        tio.save_model(tmp_path / "m", model, config)
    assert not (tmp_path / "m").exists()


# ---- mlx-lm's load_model on our directories ---------------------------------------------------------------------

MAC = dict(num_tokens=256, dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
           neural_memory_layers=[2], dim_head=16, heads=2, num_residual_streams=1, sliding_window_attn=True,
           neural_memory_kwargs={"dim_head": 16, "heads": 2}, model_type="titans_mac")


@pytest.fixture
def mac_dir(tmp_path):
    from titans_mlx.mac import Model, ModelArgs

    model = Model(ModelArgs.from_dict(MAC))
    return tio.save_model(tmp_path / "mac", model, MAC, ByteTokenizer(eos_token_id=10)), model


def test_mac_dir_has_mlx_lm_model_file(mac_dir):
    out, _ = mac_dir
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "titans_model.py",
                                                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == "titans_model.py" and config["eos_token_id"] == 10
    source = (out / "titans_model.py").read_text()
    assert "from titans_mlx.mac import Model, ModelArgs" in source and "titans-mlx" in source
    from titans_mlx.mac import ModelArgs

    assert ModelArgs.from_dict(config) == ModelArgs.from_dict(MAC)  # model_file and eos_token_id are ignored


def test_load_never_runs_the_model_file(mac_dir, tmp_path):
    out, model = mac_dir
    marker = tmp_path / "ran"
    (out / "titans_model.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('executed')\n")
    ids = mx.array([list(range(40))])
    np.testing.assert_array_equal(np.array(tio.load(out)[0](ids)), np.array(model(ids)))
    assert not marker.exists()
    # and a directory without it (as written before) loads the same
    (out / "titans_model.py").unlink()
    config = json.loads((out / "config.json").read_text())
    del config["model_file"]
    (out / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(np.array(tio.load(out)[0](ids)), np.array(model(ids)))


def test_neural_memory_dir_has_no_model_file(tmp_path):
    from titans_mlx.memory import NeuralMemory

    config = {"model_type": "titans_neural_memory", "dim": 8, "chunk_size": 2}
    out = tio.save_model(tmp_path / "mem", NeuralMemory(dim=8, chunk_size=2), config)
    assert "model_file" not in json.loads((out / "config.json").read_text())
    assert not (out / "titans_model.py").exists()
    tio.load(out)


def test_mac_dir_loads_in_mlx_lm(mac_dir):
    utils = pytest.importorskip("mlx_lm.utils")
    out, model = mac_dir
    with pytest.raises(ValueError, match="trust_remote_code"):
        utils.load_model(out)
    theirs, config = utils.load_model(out, trust_remote_code=True)  # sanitize, strict load_weights, eval()
    assert type(theirs).__module__ == "titans_mlx.mac" and not theirs.training and config["model_type"] == "titans_mac"
    ids = mx.array([[int(b) for b in bytes(range(100, 150))] * 2])  # 100 tokens: many segments, memory chunks
    want = np.array(model(ids))
    np.testing.assert_array_equal(np.array(theirs(ids)), want)
    # in eval mode the memory still stores: its store-only projection (the values it writes) moves the output
    values = theirs.layers[1].mem.to_values
    values.weight = values.weight * 2
    assert not np.allclose(np.array(theirs(ids)), want, atol=1e-4)
    values.weight = values.weight / 2
    theirs.train()  # and training mode gives the same output: nothing depends on model.training
    np.testing.assert_array_equal(np.array(theirs(ids)), want)
    _, tokenizer = utils.load(str(out), trust_remote_code=True)
    assert tokenizer.eos_token_ids == {10}  # from config.json, the tokenizer having no EOS token of its own
