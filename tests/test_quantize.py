"""Quantized models (``python -m convert -q``): mlx-lm's ``quantize_model`` with the models' ``quant_predicate``.

What must stay precise stays at 8 bits or full precision, the memory's fast weights are never touched, and a
quantized directory loads with ``titans_mlx.load`` and with mlx-lm's loader. Expected values come from float models
built here from dequantized weights (``mx.dequantize``) or from the float32 model itself.
"""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, quantize_model

from titans_mlx import memory_frozen
from titans_mlx.io import build_model, load, load_config, save_model
from titans_mlx.mac import Model, ModelArgs
from titans_mlx.memory import GATES

# a MAC with every layer the predicate treats specially: all the memory's gates (momentum order 2 with learned
# combination, per-layer learning rates, weight residual, two heads), the attention pool, the qkv-view selector and
# the value-residual mix. Widths 64 (divided by the group of 64) except the feed-forward's 170-wide output projection.
MAC = dict(model_type="titans_mac", num_tokens=64, dim=64, depth=2, segment_len=4, num_longterm_mem_tokens=2,
           num_persist_mem_tokens=2, dim_head=32, heads=2, num_residual_streams=1,
           neural_memory_qkv_receives_diff_views=True, neural_mem_weight_residual=True,
           neural_memory_model={"class": "MemoryMLP", "dim": 32, "depth": 2},
           neural_memory_kwargs=dict(heads=2, dim_head=32, attn_pool_chunks=True, momentum_order=2,
                                     learned_momentum_combine=True, per_parameter_lr_modulation=True))
MEMORY = dict(model_type="titans_neural_memory", dim=64, chunk_size=4, heads=2, dim_head=32, attn_pool_chunks=True,
              momentum_order=2, learned_momentum_combine=True, per_parameter_lr_modulation=True)
LAYERS = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
PACKED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def quantized(config, bits, seed=0):
    """(float model, the same weights quantized, the quantized config) from a random model."""
    mx.random.seed(seed)
    model = build_model(config)
    float_model = build_model(config)
    float_model.load_weights(list(tree_flatten(model.parameters())), strict=True)
    q, q_config = quantize_model(model, config, 64, bits)  # quant_predicate comes from the model, as in mlx-lm
    return float_model, q, q_config


def dequantized(q, config):
    """The reference: a float model of the same config whose weights are the quantized layers' weights dequantized
    here, run through the plain (unquantized) code paths."""
    weights = dict(tree_flatten(q.parameters()))
    for path, module in q.named_modules():
        if isinstance(module, PACKED):
            for name in ("weight", "scales", "biases"):
                weights.pop(f"{path}.{name}")
            weights[f"{path}.weight"] = mx.dequantize(module.weight, module.scales, module.biases,
                                                      module.group_size, module.bits)
    ref = build_model(config)
    ref.load_weights(list(weights.items()), strict=True)
    return ref


def kinds(model):
    """path -> (layer class, bits) for every linear/embedding layer."""
    return {path: (type(m).__name__, getattr(m, "bits", None)) for path, m in model.named_modules()
            if isinstance(m, LAYERS)}


def rel_err(got, want):
    return (mx.abs(got - want).max() / mx.abs(want).max()).item()


def tokens(seed=1):
    return mx.random.randint(0, MAC["num_tokens"], (2, 40), key=mx.random.key(seed))


# ---- what the predicate keeps precise --------------------------------------------------------------------------------


def test_mac_predicate_keeps_precise_layers():
    float_model, q, q_config = quantized(MAC, bits=4)
    got = kinds(q)
    gates = {p for p in got if p.split(".")[-1] in GATES}
    assert {p.split(".")[-1] for p in gates} == set(GATES)  # the config has every gate
    eight = {"layers.0.mem.reduce_to_chunk_rep.to_attn_logits", "layers.1.mem.reduce_to_chunk_rep.to_attn_logits",
             "layers.1.attn.to_learned_v_mix", "layers.1.mem_qkv_selector.proj"}
    axial = {p for p in got if p.startswith("axial_pos_emb.")}
    too_wide = {"layers.0.ff.proj_out", "layers.1.ff.proj_out"}  # 170 inputs: the group of 64 does not divide them
    for path in gates | axial | too_wide:
        assert got[path] == ("Linear", None), path
    for path in eight:
        assert got[path] == ("QuantizedLinear", 8), path
        assert q_config["quantization"][path] == {"group_size": 64, "bits": 8}  # recorded for the loaders
    rest = set(got) - gates - axial - too_wide - eight
    assert {"token_emb", "to_logits", "layers.1.mem.to_queries", "layers.1.mem.combine_heads"} <= rest
    for path in rest:
        assert got[path] in {("QuantizedLinear", 4), ("QuantizedEmbedding", 4)}, path
    assert {k: v for k, v in q_config["quantization"].items() if not isinstance(v, dict)} == \
        {"group_size": 64, "bits": 4, "mode": "affine"}

    # the memory's fast weights and every other plain array are untouched: same values, still float32
    before = dict(tree_flatten(float_model.parameters()))
    packed = {p for p, m in q.named_modules() if isinstance(m, PACKED)}
    plain = {k: v for k, v in tree_flatten(q.parameters()) if k.rsplit(".", 1)[0] not in packed}
    fast = [k for k in plain if ".memory_model_parameters." in k]
    assert len(fast) == 2 * 3  # two memories, MemoryMLP depth 2 under ResidualNorm: gamma + two matrices
    for k, v in plain.items():
        assert v.dtype == mx.float32 and mx.array_equal(v, before[k]), k


def test_bare_memory_predicate():
    _, q, q_config = quantized(MEMORY, bits=4)
    got = kinds(q)
    gates = [path for path in got if path in GATES]
    assert len(gates) == 6  # all but the weight-residual mix, which only a MAC's later memories have
    for path in gates:
        assert got[path] == ("Linear", None), path
    assert got["reduce_to_chunk_rep.to_attn_logits"] == ("QuantizedLinear", 8)
    for path in ("to_queries", "to_keys", "to_values", "combine_heads"):
        assert got[path] == ("QuantizedLinear", 4), path
    assert all(v.dtype == mx.float32 for v in q.memory_model_parameters)


# ---- loading ---------------------------------------------------------------------------------------------------------


def test_quantized_dir_loads_in_titans_mlx_and_mlx_lm(tmp_path):
    _, q, q_config = quantized(MAC, bits=4)
    out = save_model(tmp_path / "q4", q, q_config)
    written = json.loads((out / "config.json").read_text())
    assert written["quantization"] == written["quantization_config"] == json.loads(json.dumps(q_config["quantization"]))
    ids = tokens()
    want = q(ids)

    model, _ = load(out)
    assert kinds(model) == kinds(q)
    assert mx.array_equal(model(ids), want)  # the same packed weights through the same kernels

    # mlx-lm's loader: through the directory's model_file when it has one, else given the classes
    how = {"trust_remote_code": True} if "model_file" in written else {"get_model_classes": lambda config: (Model,
                                                                                                          ModelArgs)}
    model, config = load_model(out, **how)
    assert kinds(model) == kinds(q)
    assert mx.array_equal(model(ids), want)


def test_quantized_dir_is_checked_strictly(tmp_path):
    _, q, q_config = quantized(MAC, bits=8)
    out = save_model(tmp_path / "q8", q, q_config)
    weights = mx.load(str(out / "model.safetensors"))

    def load_without(key):
        mx.save_safetensors(str(out / "model.safetensors"), {k: v for k, v in weights.items() if k != key})
        return load(out)

    # a layer config.json records is quantized whatever the file holds: its missing scales are named
    with pytest.raises(ValueError, match="lacks weight layers.1.attn.to_learned_v_mix.scales"):
        load_without("layers.1.attn.to_learned_v_mix.scales")
    # one that follows the default is quantized where its scales are (as in mlx-lm): without them its packed
    # weight and biases do not fit a float layer
    with pytest.raises(ValueError, match=r"layers\.1\.mem\.to_keys\.(biases|weight)"):
        load_without("layers.1.mem.to_keys.scales")


def test_bare_memory_round_trip(tmp_path):
    _, q, q_config = quantized(MEMORY, bits=8)
    out = save_model(tmp_path / "nm", q, q_config)
    assert load_config(out)["quantization"]["bits"] == 8
    mem, tok = load(out)
    assert tok is None and kinds(mem) == kinds(q)
    x = mx.random.normal((2, 23, MEMORY["dim"]), key=mx.random.key(2))  # five chunks of 4 and a partial one
    y, _ = mem(x)
    assert mx.array_equal(y, q(x)[0])
    # the memory reads its quantized projections' weights itself (not by calling the layers): dequantized, they
    # must give what the float memory gives with those weights. Same float32 products in another order: 1e-5.
    assert rel_err(y, dequantized(q, MEMORY)(x)[0]) <= 1e-5


# ---- accuracy --------------------------------------------------------------------------------------------------------


def test_8bit_mac_matches_its_dequantized_weights_and_stays_near_float32():
    float_model, q, _ = quantized(MAC, bits=8)
    ids = tokens()
    got = q(ids)
    # quantized matmuls and embeddings compute with exactly the dequantized weights; only the float32 summation
    # order may differ (the CPU gives identical results): 1e-5 relative
    assert rel_err(got, dequantized(q, MAC)(ids)) <= 1e-5
    # 8 bits round each weight to 1/255 of its group's range (~0.4% rms); the random memory, written at every chunk
    # with untrained step sizes, amplifies that: 1.1-4.4% of the largest logit on seeds 0-5, and 26-89% at 4 bits.
    # 0.1 accepts the first and not the second.
    assert rel_err(got, float_model(ids)) <= 0.1


# Genesis 20 (King James Version, public domain): the first chapter of the demo model's held-out split
# (demo/prepare_corpus.py holds out every 20th chapter), one verse per line as the model was trained; wrapped here
# with two-space continuation lines, which GENESIS_20 joins back.
_GENESIS_20 = """\
Genesis 20
And Abraham journeyed from thence toward the south country, and dwelled between Kadesh and Shur, and sojourned in
  Gerar.
And Abraham said of Sarah his wife, She is my sister: and Abimelech king of Gerar sent, and took Sarah.
But God came to Abimelech in a dream by night, and said to him, Behold, thou art but a dead man, for the woman which
  thou hast taken; for she is a man's wife.
But Abimelech had not come near her: and he said, LORD, wilt thou slay also a righteous nation?
Said he not unto me, She is my sister? and she, even she herself said, He is my brother: in the integrity of my
  heart and innocency of my hands have I done this.
And God said unto him in a dream, Yea, I know that thou didst this in the integrity of thy heart; for I also
  withheld thee from sinning against me: therefore suffered I thee not to touch her.
Now therefore restore the man his wife; for he is a prophet, and he shall pray for thee, and thou shalt live: and if
  thou restore her not, know thou that thou shalt surely die, thou, and all that are thine.
Therefore Abimelech rose early in the morning, and called all his servants, and told all these things in their ears:
  and the men were sore afraid.
Then Abimelech called Abraham, and said unto him, What hast thou done unto us? and what have I offended thee, that
  thou hast brought on me and on my kingdom a great sin? thou hast done deeds unto me that ought not to be done.
And Abimelech said unto Abraham, What sawest thou, that thou hast done this thing?
And Abraham said, Because I thought, Surely the fear of God is not in this place; and they will slay me for my
  wife's sake.
And yet indeed she is my sister; she is the daughter of my father, but not the daughter of my mother; and she became
  my wife.
And it came to pass, when God caused me to wander from my father's house, that I said unto her, This is thy kindness
  which thou shalt shew unto me; at every place whither we shall come, say of me, He is my brother.
And Abimelech took sheep, and oxen, and menservants, and womenservants, and gave them unto Abraham, and restored him
  Sarah his wife.
And Abimelech said, Behold, my land is before thee: dwell where it pleaseth thee.
And unto Sarah he said, Behold, I have given thy brother a thousand pieces of silver: behold, he is to thee a
  covering of the eyes, unto all that are with thee, and with all other: thus she was reproved.
So Abraham prayed unto God: and God healed Abimelech, and his wife, and his maidservants; and they bare children.
For the LORD had fast closed up all the wombs of the house of Abimelech, because of Sarah Abraham's wife.

"""
GENESIS_20 = _GENESIS_20.replace("\n  ", " ")


def bits_per_byte(model, ids):
    """As demo/check_half_precision.py: mean -log2 p of each next byte."""
    logits = model(ids).astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.take_along_axis(lp[0, :-1], ids[0, 1:, None], axis=-1).mean().item() / math.log(2)


def test_demo_model_8bit_bits_per_byte_within_1_percent_of_float32():
    from titans_mlx.generate import DEFAULT_MODEL

    model, tok = load(DEFAULT_MODEL)
    ids = mx.array([tok.encode(GENESIS_20)])
    assert ids.shape[1] == 2613
    # the memory writes a chunk every 36 positions: about 80 writes here, and they matter to the score
    assert model.positions_for(ids.shape[1]) // model.layers[1].mem.chunk_size >= 80
    f32 = bits_per_byte(model, ids)
    with memory_frozen(model):
        frozen = bits_per_byte(model, ids)
    assert frozen - f32 > 0.03  # measured 0.073 bits/byte: the memory's writes are part of what is compared

    q, _ = quantize_model(model, load_config(DEFAULT_MODEL), 64, 8)
    assert isinstance(q.layers[1].mem.to_keys, nn.QuantizedLinear)
    q8 = bits_per_byte(q, ids)
    # the bound; measured +0.011% on this chapter (4 bits: +0.75%; over 16 KB, demo/check_quantization.py)
    assert abs(q8 / f32 - 1) <= 0.01
