"""The paper's architectures (titans_mag, titans_mal, titans_lmm, titans_mac with paper_order): any split of a sequence
equals one call, causality inside a chunk, gradients into the memory, model dirs, sessions, the CLIs, bad configs.
(Their numbers against the paper's equations: tests/test_variants_oracle.py.)"""

import json
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from titans_mlx import decode
from titans_mlx.cache import check_cache
from titans_mlx.io import MLX_LM_CONFIG_KEYS, build_model, complete_config, load, save_model
from titans_mlx.tokenizer import ByteTokenizer
from titans_mlx.variants import LMMBlock, MAGBlock, MALBlock, PaperMACLayer

BASE = dict(num_tokens=256, dim=16, depth=2, segment_len=5, heads=2, dim_head=8, num_persist_mem_tokens=2,
            neural_memory_segment_len=3, neural_memory_batch_size=3, num_residual_streams=1,
            neural_memory_model={"class": "MemoryMLP", "dim": 16, "depth": 2, "expansion_factor": 2.0})

VARIANTS = {
    "mag": dict(model_type="titans_mag"),
    "mal": dict(model_type="titans_mal"),
    "lmm": dict(model_type="titans_lmm", num_persist_mem_tokens=0),
    "mac_paper": dict(model_type="titans_mac", paper_order=True),
    # segment 5 + 2 long-term tokens: windows of 7 positions the memory's chunks of 3 straddle
    "mac_paper_longterm_sliding": dict(model_type="titans_mac", paper_order=True, num_longterm_mem_tokens=2,
                                       sliding_window_attn=True),
    "mag_streams_momentum_off": dict(model_type="titans_mag", num_residual_streams=2,
                                     neural_memory_kwargs={"momentum": False}, absolute_positions=False),
    "mal_memory_in_layer_2_wres": dict(model_type="titans_mal", depth=3, neural_memory_layers=[2, 3],
                                       neural_mem_weight_residual=True),
    "lmm_linear_no_batch": dict(model_type="titans_lmm", num_persist_mem_tokens=0, neural_memory_batch_size=None,
                                neural_memory_model={"class": "MemoryMLP", "dim": 16, "depth": 1}),
}
BLOCKS = {"titans_mag": MAGBlock, "titans_mal": MALBlock, "titans_lmm": LMMBlock}


def make(name, seed=0):
    mx.random.seed(seed)
    cfg = dict(BASE, **VARIANTS[name])
    model = build_model(cfg)
    mx.eval(model.parameters())
    return model, cfg


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_split(model, tokens, cuts, cache=None):
    cache = model.make_cache() if cache is None else cache
    outs = [model(tokens[:, a:b], cache=cache) for a, b in cuts]
    return mx.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_blocks_are_the_variant_and_any_split_equals_one_call(name):
    model, cfg = make(name)
    kind = PaperMACLayer if cfg.get("paper_order") else BLOCKS[cfg["model_type"]]
    assert all(type(layer) is kind for layer in model.layers)
    tokens = mx.array(np.random.RandomState(1).randint(0, 256, (2, 23)))
    full = model(tokens)
    n, rng = tokens.shape[1], random.Random(name)
    splits = [[(i, i + 1) for i in range(n)], [(0, 4), (4, 4), (4, 13), (13, n)]]
    for _ in range(3):
        cuts, i = [], 0
        while i < n:
            j = min(n, i + rng.randint(1, 8))
            cuts.append((i, j))
            i = j
        splits.append(cuts)
    for cuts in splits:
        got, cache = run_split(model, tokens, cuts)
        assert rel_err(got, full) <= 1e-5, cuts
    check_cache(model, cache)


@pytest.mark.parametrize("name", ["mag", "mal", "lmm", "mac_paper", "mac_paper_longterm_sliding"])
def test_changing_a_token_never_changes_an_earlier_output(name):
    model, _ = make(name)
    base = np.random.RandomState(2).randint(0, 256, (1, 16))
    full = np.array(model(mx.array(base)))
    for j in (1, 4, 7, 8, 13):  # inside chunks of 3 and segments of 5, and on their edges
        changed = base.copy()
        changed[0, j] = (changed[0, j] + 17) % 256
        out = np.array(model(mx.array(changed)))
        assert np.array_equal(out[:, :j], full[:, :j]), j
        assert not np.allclose(out[:, j], full[:, j])


def test_later_segments_depend_on_the_memory_not_only_attention():
    # LMM has no attention: a token can reach a later output only through the memory's state
    model, _ = make("lmm")
    base = np.random.RandomState(3).randint(0, 256, (1, 16))
    changed = base.copy()
    changed[0, 0] += 1
    a, b = model(mx.array(base)), model(mx.array(changed))
    assert float(mx.abs(a[0, -1] - b[0, -1]).max()) > 0


@pytest.mark.parametrize("name", ["mag", "mal", "lmm", "mac_paper"])
def test_gradients_reach_the_memory(name):
    model, _ = make(name)
    ids = mx.array(np.random.RandomState(4).randint(0, 256, (2, 17)))
    weights = mx.array(np.random.RandomState(5).rand(2, 16).astype(np.float32))
    loss, grads = nn.value_and_grad(model, lambda ids: model.loss(ids, weights))(ids)
    grads = dict(tree_flatten(grads))
    for i in range(len(model.layers)):
        for part in ("to_keys.weight", "to_values.weight", "to_queries.weight", "to_adaptive_step.weight",
                     "to_decay_factor.weight", "memory_model_parameters.0"):
            g = grads[f"layers.{i}.mem.{part}"]
            assert float(mx.abs(g).max()) > 0, (i, part)
    # the weighted loss is the weighted mean of the per-target losses
    logits = model(ids[:, :-1])
    per = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
    assert abs(float(loss) - float((per * weights).sum() / weights.sum())) < 1e-5


@pytest.mark.parametrize("name", ["mal", "lmm", "mac_paper_longterm_sliding"])
def test_model_dir_and_prompt_cache_file_round_trip(name, tmp_path):
    model, cfg = make(name)
    save_model(tmp_path / "m", model, cfg, ByteTokenizer())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in MLX_LM_CONFIG_KEYS:  # what mlx-lm's loader reads (the variants load there too)
        config.pop(key, None)
    assert config == json.loads(json.dumps(complete_config(cfg)))
    assert config["model_type"] == cfg["model_type"] and config["paper_order"] == bool(cfg.get("paper_order"))
    loaded, tokenizer = load(tmp_path / "m")
    tokens = mx.array(np.random.RandomState(6).randint(0, 256, (1, 19)))
    full = model(tokens)
    assert rel_err(loaded(tokens), full) == 0
    # a prompt cache saved mid-segment (the paper-order MAC keeps its segment-start weights there) resumes exactly
    first, cache = run_split(loaded, tokens, [(0, 9)])
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    cache = load_prompt_cache(str(tmp_path / "c.safetensors"))
    check_cache(loaded, cache)
    rest, _ = run_split(loaded, tokens, [(9, 12), (12, 19)], cache)
    assert rel_err(mx.concatenate([first, rest], axis=1), full) <= 1e-5


def test_generation_takes_the_general_path_and_matches_a_full_forward():
    from titans_mlx.generate import generate_step

    model, _ = make("mac_paper")
    prompt = mx.array(np.random.RandomState(7).randint(0, 256, (12,)))
    cache = model.make_cache()
    model(prompt[None, :11], cache=cache)
    assert decode.eligible(model, cache, prompt[None, 11:]) is None  # the compiled step is the MAC's own
    out = [t for t, _ in zip((tok for tok, _ in generate_step(prompt, model, max_tokens=6)), range(6))]
    ids = prompt.tolist()
    for _ in range(6):  # greedy, every step one uncached forward of the whole sequence
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    assert out == ids[12:]


@pytest.mark.parametrize("overrides,message", [
    (dict(model_type="titans_magg"), "unknown model_type 'titans_magg'; expected one of"),
    (dict(model_type="titans_mag", paper_order=True), "paper_order is an option of titans_mac, not of titans_mag"),
    (dict(model_type="titans_mal", num_longterm_mem_tokens=4), "num_longterm_mem_tokens must be 0, got 4"),
    (dict(model_type="titans_lmm"), "num_persist_mem_tokens must be 0, got 2"),
    (dict(model_type="titans_lmm", num_persist_mem_tokens=0, neural_memory_layers=[1]), "every layer needs one"),
    (dict(model_type="titans_mag", neural_mem_gate_attn_output=True), "neural_mem_gate_attn_output is an option"),
    (dict(model_type="titans_mac", paper_order=True, neural_mem_weight_residual=True), "not of paper_order"),
    (dict(model_type="titans_mac", paper_order=True, neural_memory_model={"class": "MemoryAttention", "dim": 16}),
     "reads across tokens"),
])
def test_configs_that_do_not_fit_are_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_model(dict(BASE, **overrides))


def test_model_args_take_the_language_model_types_only():
    from titans_mlx.mac import ModelArgs

    with pytest.raises(ValueError, match="model_type must be one of titans_mac, titans_mag, titans_mal, titans_lmm, "
                                         "got 'titans_neural_memory'"):
        ModelArgs.from_dict(dict(BASE, model_type="titans_neural_memory"))


def test_train_cli_accepts_the_variants(tmp_path, capsys):
    from titans_mlx.train import main

    cfg = dict(BASE, **VARIANTS["mag"])
    (tmp_path / "mag.json").write_text(json.dumps(cfg))
    (tmp_path / "text.txt").write_text("the memory learns at test time. " * 40)
    rc = main(["--config", str(tmp_path / "mag.json"), "--data", str(tmp_path / "text.txt"), "--out",
               str(tmp_path / "run"), "--seq-len", "20", "--batch-size", "2", "--iters", "2", "--val-batches", "0",
               "--steps-per-report", "1"])
    assert rc == 0
    model, _ = load(tmp_path / "run")
    assert type(model.layers[0]) is MAGBlock
    from titans_mlx.generate import main as generate

    assert generate(["--model", str(tmp_path / "run"), "--prompt", "the", "--max-tokens", "4", "--verbose", "false"]) == 0
    before = build_model(cfg).parameters()  # another draw: only the shapes matter here
    assert dict(tree_flatten(before)).keys() == dict(tree_flatten(model.parameters())).keys()
    (tmp_path / "neural.json").write_text(json.dumps({"model_type": "titans_neural_memory", "dim": 16}))
    rc = main(["--config", str(tmp_path / "neural.json"), "--data", str(tmp_path / "text.txt"), "--out",
               str(tmp_path / "run2"), "--seq-len", "20", "--batch-size", "2", "--iters", "1"])
    assert rc != 0 and "expected one of titans_mac, titans_mag, titans_mal, titans_lmm" in capsys.readouterr().err


def test_evaluation_harness_runs_a_variant_and_knows_lmm_has_no_attention(tmp_path):
    from titans_mlx import evaluate as ev

    lmm, _ = make("lmm")
    assert ev.attention_reach(lmm) == 0 and not ev.attention_sees(lmm, 10, 9)
    mag, _ = make("mag")
    assert ev.attention_reach(mag) == 2 * 5 and ev.attention_sees(mag, 20, 10) and not ev.attention_sees(mag, 21, 10)
    results = ev.evaluate(mag, ByteTokenizer(), tasks=["passkey"], lengths=[300], depths=[0.5], samples=1,
                          ablation="frozen-memory")
    assert [r["ablation"] for r in results["samples"]] == [None, "frozen-memory"]
    assert results["config"]["attention_reach_positions"] == 10


def test_presets_are_valid_configs_of_every_architecture():
    from titans_mlx.io import block_class
    from titans_mlx.mac import ModelArgs
    from titans_mlx.presets import PRESETS, preset
    from titans_mlx.train_setup import TrainError, _read_config

    assert {name.split("-")[0] for name in PRESETS} == {"mac", "mag", "mal", "lmm", "swa"}
    for name in PRESETS:
        args = ModelArgs.from_dict(preset(name))
        block_class(args).check_args(args)  # the paper-size ones are checked, not built (170M parameters)
    paper = preset("mag-paper-170m")
    assert (paper["segment_len"], paper["neural_memory_segment_len"], paper["num_persist_mem_tokens"]) == (2048, 16, 128)
    assert preset("mac-paper-170m")["num_longterm_mem_tokens"] == 256 and preset("mac-paper-170m")["segment_len"] == 512
    model = build_model(preset("mal-laptop"))
    assert type(model.layers[0]) is MALBlock
    assert _read_config("preset:lmm-laptop")["model_type"] == "titans_lmm"
    with pytest.raises(TrainError, match="unknown preset 'nope'"):
        _read_config("preset:nope")


def test_bench_mac_runs_a_variant_and_knows_titans_pytorch_has_none(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    config = dict(BASE, num_tokens=64, depth=1, **VARIANTS["mac_paper"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    bench = [sys.executable, "-m", "bench", "mac", "--depths", "20", "--tg", "2", "--prefill-step", "10",
             "--matmul-size", "0", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path), "--no-plot"]
    r = subprocess.run(bench + ["--impl", "torch"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "titans-pytorch has no 'titans_mac' in the paper order" in r.stderr, r.stderr
    r = subprocess.run(bench + ["--impl", "mlx", "--name", "smoke"], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    (res,) = json.loads((tmp_path / "smoke.json").read_text())["results"]
    assert res["status"] == "ok" and res["decode_tokens_per_s"] > 0, res


def test_memory_records_for_inspect():
    model, _ = make("mal")
    tokens = mx.array(np.random.RandomState(8).randint(0, 256, (1, 10)))
    logits, records = model(tokens, return_memory=True)
    assert rel_err(logits, model(tokens)) == 0
    assert [r["retrieved"].shape for r in records] == [(1, 10, 16)] * 2 and records[0]["forget"].shape == (1, 1, 3)
    paper, _ = make("mac_paper")
    with pytest.raises(ValueError, match="does not cover the paper-order MAC"):
        paper(tokens, return_memory=True)


def test_comparison_report_shows_every_run_as_measured():
    from bench.variants import config_for, render

    assert config_for("mag_lr01", "tiny")["neural_memory_kwargs"] == {"default_step_transform_max_lr": 0.1}
    assert config_for("swa", "tiny")["neural_memory_layers"] == [] and config_for("mac", "laptop")["paper_order"]
    cell = {"correct": 1, "n": 2, "digit_accuracy": 0.5}
    ok = {"arch": "mal", "name": "MAL", "config": {}, "params": 1000, "val_bits_per_byte_init": 8.0,
          "val_bits_per_byte": 4.25, "train_seconds": 9, "attention_reach_positions": 128,
          "summary": {"passkey": {"learning": cell, "frozen-memory": dict(cell, correct=0)}}}
    failed = {"arch": "lmm", "name": "LMM", "config": {}, "train_seconds": 3,
              "error": "error: the loss is nan at step 15; stopped (nothing saved)"}
    settings = dict(tasks="passkey", iters=10, batch_size=2, seq_len=8, data="d.txt", learning_rate=1e-3, warmup=1,
                    seed=0, val_batches=2, lengths="512", depths="0.5", samples=2)
    md = render({"settings": settings, "results": [ok, failed], "commands": ["-m titans_mlx.train ..."],
                 "environment": {}})
    assert "| MAL | 1,000 | 8.000 -> 4.250 | 1/2 · 0.50 | 0/2 · 0.50 | 128 | 9 |" in md
    assert "| LMM | | training stopped: the loss is nan at step 15; stopped (nothing saved) |" in md
    assert "python -m titans_mlx.train ..." in md
