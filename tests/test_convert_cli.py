"""python -m convert, run as a subprocess: real titans-pytorch checkpoints in, model directories out; bad input out
with one line on stderr, a non-zero exit, nothing executed and no output directory."""

import io
import json
import pickle
import subprocess
import sys
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, ROOT

CK = FIXTURES / "convert"


def run(*args):
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def convert_ok(*args):
    res = run(*args)
    assert res.returncode == 0, res.stderr
    return res


def assert_fails(res, match, out=None, code=1):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


MAC_ARGS = ("--torch-path", CK / "mac_tiny.pt", "--config", CK / "mac_tiny.json")


def rel_err(got, want):
    return float(np.abs(np.array(got) - want).max() / np.abs(want).max())


# ---- end to end: needs the model classes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mac_module():
    pytest.importorskip("titans_mlx.memory")  # the fixture model has a memory layer
    return pytest.importorskip("titans_mlx.mac")


def test_mac_end_to_end(tmp_path, mac_module):
    from titans_mlx.io import load
    from titans_mlx.tokenizer import ByteTokenizer

    out = tmp_path / "mac"
    res = convert_ok(*MAC_ARGS, "--mlx-path", out)
    assert "Saved" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "titans_model.py",
                                                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "titans_mac" and config["segment_len"] == 4 and config["neural_memory_layers"] == [2]
    model, tok = load(out)
    assert isinstance(tok, ByteTokenizer)
    ref = np.load(CK / "mac_tiny.npz")
    assert rel_err(model(mx.array(ref["tokens"])), ref["logits"]) <= 1e-4

    # what load returns drives mlx-lm's generation as is: greedy, cached, equals an uncached argmax loop
    mlx_lm = pytest.importorskip("mlx_lm")
    text = "".join(r.text for r in mlx_lm.stream_generate(model, tok, "Titans", max_tokens=9))
    ids = tok.encode("Titans")
    for _ in range(9):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    assert text == tok.decode(ids[6:])


def test_config_completed_from_weights(tmp_path, mac_module):
    from titans_mlx.io import load

    # sizes, layers and memory heads come from the weights; only what they cannot tell is given
    minimal = write_json(tmp_path / "c.json", {"segment_len": 4,
                                              "neural_memory_model": {"class": "MemoryMLP", "dim": 8, "depth": 2}})
    out = tmp_path / "mac"
    convert_ok("--torch-path", CK / "mac_tiny.pt", "--config", minimal, "--mlx-path", out)
    ref = np.load(CK / "mac_tiny.npz")
    assert rel_err(load(out)[0](mx.array(ref["tokens"])), ref["logits"]) <= 1e-4


def test_mac_bf16_checkpoint(tmp_path, mac_module):
    from titans_mlx.io import load

    ref = np.load(CK / "mac_tiny_bf16.npz")
    out = tmp_path / "f32"
    convert_ok("--torch-path", CK / "mac_tiny_bf16.pt", "--config", CK / "mac_tiny.json", "--mlx-path", out,
               "--dtype", "float32")
    model, _ = load(out)
    assert rel_err(model(mx.array(ref["tokens"])), ref["logits"]) <= 1e-4
    kept = tmp_path / "bf16"
    convert_ok("--torch-path", CK / "mac_tiny_bf16.pt", "--config", CK / "mac_tiny.json", "--mlx-path", kept)
    assert {v.dtype for v in mx.load(str(kept / "model.safetensors")).values()} == {mx.bfloat16}


def test_config_stored_in_checkpoint(tmp_path, mac_module):
    from titans_mlx.io import load

    out = tmp_path / "wrapped"
    res = convert_ok("--torch-path", CK / "mac_wrapped.pt", "--mlx-path", out)
    assert "config stored in the checkpoint" in res.stdout
    ref = np.load(CK / "mac_tiny.npz")
    assert rel_err(load(out)[0](mx.array(ref["tokens"])), ref["logits"]) <= 1e-4


def test_neural_memory_end_to_end(tmp_path):
    pytest.importorskip("titans_mlx.memory")
    from titans_mlx.io import load

    out = tmp_path / "nm"
    convert_ok("--torch-path", CK / "nm_tiny.pt", "--config", CK / "nm_tiny.json", "--kind", "neural-memory",
               "--mlx-path", out)
    assert not (out / "tokenizer.json").exists()
    mem, tok = load(out)
    assert tok is None
    ref = np.load(CK / "nm_tiny.npz")
    y, _ = mem(mx.array(ref["x"]))
    assert rel_err(y, ref["y"]) <= 1e-5
    # dim, heads, dim_head and the weight-bearing flags come from the weights; chunk_size cannot
    minimal = write_json(tmp_path / "nm.json", {"chunk_size": 2})
    convert_ok("--torch-path", CK / "nm_tiny.pt", "--config", minimal, "--kind", "neural-memory", "--mlx-path", out,
               "--force")
    assert json.loads((out / "config.json").read_text())["heads"] == 2
    y, _ = load(out)[0](mx.array(ref["x"]))
    assert rel_err(y, ref["y"]) <= 1e-5
    bad = write_json(tmp_path / "bad.json", {"chunk_size": 2, "momentum": False})
    assert_fails(run("--torch-path", CK / "nm_tiny.pt", "--config", bad, "--kind", "neural-memory", "--mlx-path",
                     tmp_path / "x"), "momentum=False does not fit the checkpoint: to_momentum.0.weight is present")


def test_sentencepiece_tokenizer(tmp_path, mac_module):
    spm = pytest.importorskip("sentencepiece")
    from titans_mlx.io import load
    from titans_mlx.tokenizer import SentencePieceTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a tiny corpus of words, words and more words"] * 50),
                                   model_writer=buf, vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "t.model").write_bytes(buf.getvalue())
    out = tmp_path / "spm"
    convert_ok(*MAC_ARGS, "--mlx-path", out, "--tokenizer", tmp_path / "t.model")
    _, tok = load(out)
    assert isinstance(tok, SentencePieceTokenizer) and tok.decode(tok.encode("more words")) == "more words"

    buf = io.BytesIO()  # byte fallback: 256 byte pieces + words, more than the model's 256 tokens
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a tiny corpus of words, words and more words"] * 50),
                                   model_writer=buf, vocab_size=300, hard_vocab_limit=False, byte_fallback=True,
                                   minloglevel=2)
    (tmp_path / "big.model").write_bytes(buf.getvalue())
    assert_fails(run(*MAC_ARGS, "--mlx-path", tmp_path / "x", "--tokenizer", tmp_path / "big.model"),
                 "but the model only 256", tmp_path / "x")
    convert_ok(*MAC_ARGS, "--mlx-path", tmp_path / "none", "--tokenizer", "none")
    assert load(tmp_path / "none")[1] is None


def test_force(tmp_path, mac_module):
    out = tmp_path / "mac"
    convert_ok(*MAC_ARGS, "--mlx-path", out)
    before = (out / "model.safetensors").read_bytes()
    assert_fails(run(*MAC_ARGS, "--mlx-path", out), "already exists (pass --force")
    convert_ok(*MAC_ARGS, "--mlx-path", out, "--force", "--dtype", "float16")
    assert (out / "model.safetensors").read_bytes() != before
    other = tmp_path / "docs"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert_fails(run(*MAC_ARGS, "--mlx-path", other, "--force"), "not a model directory")
    assert (other / "thesis.tex").read_text() == "precious"


def test_weight_shape_mismatch_names_key(tmp_path, mac_module):
    config = json.loads((CK / "mac_tiny.json").read_text())
    out = tmp_path / "o"
    bad = write_json(tmp_path / "c.json", {**config, "ff_mult": 2})
    res = run("--torch-path", CK / "mac_tiny.pt", "--config", bad, "--mlx-path", out)
    assert_fails(res, "the checkpoint has shape", out)
    assert "layers.0.ff" in res.stderr and "the config gives" in res.stderr
    bad = write_json(tmp_path / "c.json", {**config, "neural_memory_model": {"class": "MemoryMLP", "dim": 8, "depth": 3}})
    assert_fails(run("--torch-path", CK / "mac_tiny.pt", "--config", bad, "--mlx-path", out), "lacks weights", out)
    bad = write_json(tmp_path / "c.json", {**config, "neural_memory_kwargs": {"qk_rmsnorm": True}})
    assert_fails(run("--torch-path", CK / "mac_tiny.pt", "--config", bad, "--mlx-path", out),
                 "qk_rmsnorm=True does not fit the checkpoint: layers.1.4.q_norm.gamma is absent", out)


DEMO = ROOT / "titans_mlx" / "demo_model"


def test_quantize(tmp_path, mac_module):
    import mlx.nn as nn
    from titans_mlx.io import load

    # an MLX model directory, as the README shows: 8 bits in groups of 64; its tokenizer comes along
    q8 = tmp_path / "q8"
    res = convert_ok("--model", DEMO, "--mlx-path", q8, "-q", "--q-bits", "8")
    assert "Quantizing to 8 bits in groups of 64" in res.stdout and "Saved" in res.stdout
    config = json.loads((q8 / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization_config"] == config["quantization"]
    model, tok = load(q8)
    assert tok is not None and tok.decode(tok.encode("Moses")) == "Moses"
    head = model.to_logits
    assert isinstance(head, nn.QuantizedLinear) and (head.bits, head.group_size) == (8, 64)
    assert (q8 / "model.safetensors").stat().st_size < 0.5 * (DEMO / "model.safetensors").stat().st_size
    assert_fails(run("--model", q8, "--mlx-path", tmp_path / "again", "-q"), "is already quantized (8-bit)",
                 tmp_path / "again")

    # defaults 4 bits / 64, after --dtype: the scales take the new dtype, the memory's fast weights stay float32
    q4 = tmp_path / "q4"
    convert_ok("--model", DEMO, "--mlx-path", q4, "-q", "--dtype", "bfloat16")
    weights = mx.load(str(q4 / "model.safetensors"))
    assert weights["to_logits.weight"].dtype == mx.uint32 and weights["to_logits.scales"].dtype == mx.bfloat16
    assert load(q4)[0].to_logits.bits == 4
    fast = [k for k in weights if ".mem.memory_model_parameters." in k]
    assert fast and {weights[k].dtype for k in fast} == {mx.float32}

    # a checkpoint: mac_tiny's layers are 16 or 42 wide, which no group of 32 divides, so none is packed; the
    # result loads and gives the checkpoint's logits
    out = tmp_path / "tiny"
    convert_ok(*MAC_ARGS, "--mlx-path", out, "-q", "--q-bits", "8", "--q-group-size", "32")
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8,
                                                                             "mode": "affine"}
    ref = np.load(CK / "mac_tiny.npz")
    assert rel_err(load(out)[0](mx.array(ref["tokens"])), ref["logits"]) <= 1e-4


# ---- bad input: no model classes needed ----------------------------------------------------------------------------


class _Shell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"w": _Shell(f"touch {marker}")}, protocol=2))
        zf.writestr("evil/version", "3\n")
    out = tmp_path / "out"
    assert_fails(run("--torch-path", evil, "--config", CK / "mac_tiny.json", "--mlx-path", out), "system is not allowed", out)
    bare = tmp_path / "bare.pt"
    bare.write_bytes(pickle.dumps({"w": _Shell(f"touch {marker}")}, protocol=2))
    assert_fails(run("--torch-path", bare, "--config", CK / "mac_tiny.json", "--mlx-path", out), "bare pickle", out)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "missing.pt", "no such file"),
        (lambda d: (d / "cut.pt").write_bytes((CK / "mac_tiny.pt").read_bytes()[:5000]) and d / "cut.pt",
         "corrupt or truncated"),
        (lambda d: (d / "notes.txt").write_text("hello\n" * 20) and d / "notes.txt", "not a checkpoint"),
        (lambda d: CK / "legacy.pt", "_use_new_zipfile_serialization=True"),
        (lambda d: CK / "tensors.pt", "not a titans-pytorch MemoryAsContextTransformer state dict"),
        (lambda d: CK / "nm_tiny.pt", "use --kind neural-memory"),
    ],
    ids=["missing", "truncated", "text", "legacy", "foreign-state-dict", "other-model"],
)
def test_bad_checkpoints(tmp_path, make, match):
    out = tmp_path / "out"
    assert_fails(run("--torch-path", make(tmp_path), "--config", CK / "mac_tiny.json", "--mlx-path", out), match, out)


def _without(config, key):
    return {k: v for k, v in config.items() if k != key}


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d, c: d / "none.json", "no such file"),
        (lambda d, c: (d / "c.json").write_text("{'dim': 16,}") and d / "c.json", "invalid JSON"),
        (lambda d, c: write_json(d / "c.json", [1, 2]), "expected a JSON object"),
        (lambda d, c: write_json(d / "c.json", _without(c, "segment_len")), "lacks required key 'segment_len'"),
        (lambda d, c: CK / "nm_tiny.json", "'chunk_size' is not a MemoryAsContextTransformer argument"),
        (lambda d, c: write_json(d / "c.json", {**c, "model_type": "titans_neural_memory"}), "use --kind neural-memory"),
        (lambda d, c: write_json(d / "c.json", {**c, "dim": 32}), "dim=32 does not fit the checkpoint: token_emb.weight"),
        (lambda d, c: write_json(d / "c.json", {**c, "neural_memory_layers": [1, 2]}), "NeuralMemory weights are in layers [2]"),
        (lambda d, c: write_json(d / "c.json", {**c, "token_emb": "nn.Embedding"}), "'token_emb' takes a Python object"),
        (lambda d, c: write_json(d / "c.json", {**c, "neural_memory_kwargs": {"chunk_size": 3}}), "set by MemoryAsContextTransformer"),
    ],
    ids=["missing", "bad-json", "not-object", "lacks-required", "other-model", "other-model-type", "contradicts-weights",
         "memory-layers", "python-object", "owned-kwarg"],
)
def test_bad_configs(tmp_path, make, match):
    config = json.loads((CK / "mac_tiny.json").read_text())
    out = tmp_path / "out"
    assert_fails(run("--torch-path", CK / "mac_tiny.pt", "--config", make(tmp_path, config), "--mlx-path", out), match, out)


def test_bad_arguments(tmp_path):
    out = tmp_path / "out"
    assert_fails(run(*MAC_ARGS, "--mlx-path", out, "--dtype", "float8"), "invalid choice: 'float8'", out, code=2)
    assert_fails(run("--config", CK / "mac_tiny.json", "--mlx-path", out), "--torch-path", out, code=2)
    assert_fails(run(*MAC_ARGS, "--mlx-path", out, "--tokenizer", tmp_path / "nope.model"), "expected 'bytes'", out)
    assert_fails(run("--torch-path", CK / "mac_tiny.pt", "--mlx-path", out), "--config is required", out)
    (tmp_path / "bad.model").write_bytes(b"garbage")
    assert_fails(run(*MAC_ARGS, "--mlx-path", out, "--tokenizer", tmp_path / "bad.model"), "not a sentencepiece model", out)


def test_dtype_keeps_the_memory_fast_weights_float32(tmp_path, mac_module):
    out = tmp_path / "bf16"
    convert_ok(*MAC_ARGS, "--mlx-path", out, "--dtype", "bfloat16")
    weights = mx.load(str(out / "model.safetensors"))
    fast = {k for k in weights if ".mem.memory_model_parameters." in k}
    assert fast and {weights[k].dtype for k in fast} == {mx.float32}
    assert {v.dtype for k, v in weights.items() if k not in fast} == {mx.bfloat16}


def test_bad_quantize_arguments(tmp_path):
    out = tmp_path / "out"
    assert_fails(run("--model", DEMO, "--mlx-path", out, "-q", "--q-bits", "3"), "--q-bits: invalid choice: 3", out,
                 code=2)
    assert_fails(run("--model", DEMO, "--mlx-path", out, "-q", "--q-group-size", "16"),
                 "--q-group-size: invalid choice: 16", out, code=2)
    assert_fails(run(*MAC_ARGS, "--model", DEMO, "--mlx-path", out), "not allowed with argument", out, code=2)
    assert_fails(run("--mlx-path", out, "-q"), "one of the arguments --torch-path --model is required", out, code=2)
    assert_fails(run("--model", DEMO, "--mlx-path", out, "--q-bits", "8"), "apply with -q/--quantize only", out)
    assert_fails(run("--model", tmp_path / "nope", "--mlx-path", out, "-q"), "no such directory", out)
    assert_fails(run("--model", tmp_path, "--mlx-path", out, "-q"), "not a model directory", out)
    assert_fails(run("--model", DEMO, "--config", CK / "mac_tiny.json", "--mlx-path", out, "-q"),
                 "--config applies to --torch-path only", out)
    before = (DEMO / "model.safetensors").stat().st_mtime_ns
    assert_fails(run("--model", DEMO, "--mlx-path", DEMO, "-q", "--force"), "must differ from --model")
    assert (DEMO / "model.safetensors").stat().st_mtime_ns == before
