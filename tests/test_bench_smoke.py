"""Seconds-long smoke runs of `python -m bench` (the real benchmarks are run by hand, see bench/results/)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ENV_FIELDS = ("machine", "os", "cpu", "cpu_count", "python", "versions", "git", "command", "timestamp_utc")


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_env_record():
    r = _bench("env")
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    for field in ENV_FIELDS:
        assert field in env, field
    assert "mlx" in env["versions"]
    assert env["command"].endswith("-m bench env")


@pytest.mark.parametrize("args, message", [
    (["--impl", "jax"], "--impl"),
    (["--blas", "/nonexistent/libblas.so"], "--blas"),
    (["--repeats", "0"], "--repeats"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    r = _bench("memory", "--seq-lens", "16", "--dim", "8", "--chunk", "4", "--out", str(tmp_path), *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--impl", "jax"], "--impl"),
    (["--config", "/nonexistent/config.json"], "--config"),
    (["--tg", "0"], "--tg"),
])
def test_mac_user_errors_are_one_line(tmp_path, args, message):
    r = _bench("mac", "--depths", "16", "--out", str(tmp_path), *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_memory_smoke(tmp_path):
    impls = "torch,mlx" if importlib.util.find_spec("titans_pytorch") else "mlx"
    r = _bench("memory", "--seq-lens", "128", "--dim", "32", "--chunk", "8", "--warmup", "0", "--repeats", "1",
               "--matmul-size", "64", "--matmul-repeats", "1", "--impl", impls, "--out", str(tmp_path),
               "--name", "smoke", "--no-plot")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").exists()
    for field in ENV_FIELDS:
        assert field in doc["environment"], field
    assert "--seq-lens 128" in doc["environment"]["command"]
    assert [r["impl"] for r in doc["results"]] == impls.split(",")
    for res in doc["results"]:
        assert res["status"] == "ok", res
        assert res["seq_len"] == 128 and res["chunk"] == 8
        assert res["median_s"] > 0 and res["flops"] > 0 and res["matmul"]["flops_per_s"] > 0
        assert res["blas"]["description"]
        assert res["memory"]["peak_rss_delta_bytes"] is not None
        assert ("mlx" if res["impl"] == "mlx" else "torch") in res["versions"]
    mlx_res = doc["results"][-1]
    assert mlx_res["memory"]["mlx_peak_bytes"] > 0
    if impls == "torch,mlx":
        assert len(doc["comparisons"]) == 1
        # same weights and input: the outputs agree
        assert mlx_res["check"]["max_rel_diff_vs_torch"] < 1e-4, mlx_res["check"]


def test_memory_smoke_loop_form(tmp_path):
    # --impl mlx-loop runs titans_mlx with the store's dual form off, and the report compares the two forms
    r = _bench("memory", "--seq-lens", "128", "--dim", "32", "--chunk", "8", "--warmup", "0", "--repeats", "1",
               "--matmul-size", "0", "--impl", "mlx,mlx-loop", "--out", str(tmp_path), "--name", "forms", "--no-plot")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((tmp_path / "forms.json").read_text())
    assert [(r["impl"], r["status"]) for r in doc["results"]] == [("mlx", "ok"), ("mlx-loop", "ok")]
    assert [(f["seq_len"], f["chunk"]) for f in doc["form_comparisons"]] == [(128, 8)]
    assert "loop form" in (tmp_path / "forms.md").read_text()


def test_flop_formula_default_config():
    from bench.flops import neural_memory_flops

    d, n, c = 384, 4096, 64
    h = 4 * d
    # independent re-derivation for H=1: store 4nd^2 + 10ndh, retrieve 2nd^2 + 4ndh, small terms
    big = 6 * n * d * d + 14 * n * d * h
    small = 2 * n * d + (n // c) * (4 * d + 4 * (2 * d * h + d))
    assert neural_memory_flops(n, d, c) == big + small


def test_mac_smoke(tmp_path):
    config = {"model_type": "titans_mac", "num_tokens": 64, "dim": 32, "depth": 1, "segment_len": 8, "heads": 2,
              "dim_head": 16, "num_longterm_mem_tokens": 2, "num_persist_mem_tokens": 2, "num_residual_streams": 1,
              "sliding_window_attn": True, "neural_memory_model": {"class": "MemoryMLP", "dim": 32, "depth": 1}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = _bench("mac", "--impl", "mlx", "--depths", "40", "--tg", "3", "--prefill-step", "16", "--matmul-size", "0",
               "--config", str(tmp_path / "config.json"), "--out", str(tmp_path), "--name", "smoke", "--no-plot")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((tmp_path / "smoke.json").read_text())
    (res,) = doc["results"]
    assert res["status"] == "ok", res
    assert res["depth"] == 40 and res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0
    assert res["last_block"]["tokens"] == 16 and res["mlx_peak_delta_bytes"] > 0
    prims = res["primitives_per_token"]
    assert prims["tokens"] == 10 and 0 < prims["min"] <= prims["mean"] <= prims["max"]
    md = (tmp_path / "smoke.md").read_text()
    assert "tg3 @ d40" in md and "pp40" in md


@pytest.mark.parametrize("args, message", [
    (["--impl", "jax"], "--impl"),
    (["--configs", "nonesuch"], "--configs"),
    (["--configs", "/nonexistent/config.json"], "--configs"),
    (["--seq-len", "0"], "--seq-len"),
    (["--steps", "0"], "--steps"),
])
def test_train_user_errors_are_one_line(tmp_path, args, message):
    r = _bench("train", "--out", str(tmp_path), *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_train_flop_count_generalises_the_default():
    from bench.flops import memory_forward_flops, memory_train_flops, neural_memory_flops, newton_schulz_flops

    for n, d, c, b, h, dh in [(4096, 384, 64, 1, 1, None), (572, 256, 36, 2, 1, None), (300, 64, 8, 2, 4, 16)]:
        assert memory_forward_flops(n, d, c, b, h, dh) == neural_memory_flops(n, d, c, b, h, dh)
    # spectral norm adds 5 Newton-Schulz steps per chunk, head and weight matrix (64x128 and 128x64 here)
    plain = memory_forward_flops(400, 384, 4, 1, 4, 64, [64, 128, 64])
    ns = memory_forward_flops(400, 384, 4, 1, 4, 64, [64, 128, 64], spectral_norm=True) - plain
    assert newton_schulz_flops(64, 128) == 5 * (4 * 64 * 64 * 128 + 2 * 64 ** 3) == newton_schulz_flops(128, 64)
    assert ns == 100 * 4 * 2 * newton_schulz_flops(64, 128)
    assert memory_train_flops(400, 384, 4) == 3 * memory_forward_flops(400, 384, 4)


def test_train_smoke(tmp_path):
    config = {"model_type": "titans_mac", "num_tokens": 64, "dim": 32, "depth": 2, "segment_len": 8, "heads": 2,
              "dim_head": 16, "num_longterm_mem_tokens": 2, "num_persist_mem_tokens": 2, "num_residual_streams": 1,
              "neural_memory_layers": [1, 2], "neural_memory_segment_len": 4, "neural_memory_batch_size": 8,
              "neural_mem_weight_residual": True, "neural_memory_qkv_receives_diff_views": True,
              "neural_memory_model": {"class": "MemoryMLP", "dim": 16, "depth": 2},
              "neural_memory_kwargs": {"dim_head": 16, "heads": 2, "spectral_norm_surprises": True,
                                       "attn_pool_chunks": True, "per_parameter_lr_modulation": True}}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    r = _bench("train", "--impl", "mlx", "--configs", str(tmp_path / "tiny.json"), "--seq-len", "24", "--warmup", "1",
               "--steps", "1", "--repeats", "2", "--matmul-size", "64", "--matmul-repeats", "1",
               "--memory-repeats", "1", "--out", str(tmp_path), "--name", "smoke", "--no-plot")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((tmp_path / "smoke.json").read_text())
    for field in ENV_FIELDS:
        assert field in doc["environment"], field
    (res,) = doc["results"]
    assert res["status"] == "ok", res
    assert res["config"] == "tiny" and res["tokens_per_step"] == 24 and res["tokens_per_s"] > 0
    assert len(res["step_s"]) == 2 and len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"])
    assert res["memory"]["peak_rss_delta_bytes"] is not None and res["memory"]["mlx_peak_delta_bytes"] > 0
    probe = res["memory_probe"]
    assert probe["input_shape"] == [1, 24 + 2 * 2, 32] and probe["forward_backward_flops"] > 0
    assert probe["newton_schulz_forward_flops"] > 0 and probe["efficiency_forward_backward"] > 0
    md = (tmp_path / "smoke.md").read_text()
    assert "| tiny | titans_mlx |" in md


@pytest.mark.parametrize("args, message", [
    (["--modes", "grpc"], "--modes"),
    (["--tokens", "0"], "--tokens"),
    (["--follow-ups", "0"], "--follow-ups"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_serve_user_errors_are_one_line(tmp_path, args, message):
    r = _bench("serve", "--out", str(tmp_path), *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_serve_smoke(tmp_path):
    # a real mlx_lm.server on the bundled model: the follow-up is served from the first turn's cached state
    r = _bench("serve", "--tokens", "200", "--follow-ups", "1", "--max-tokens", "2", "--modes", "completions",
               "--out", str(tmp_path), "--name", "s")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    (s,) = doc["summary"]
    assert s["first_prompt_tokens"] == 200 and s["follow_up_cached_tokens"] == [202]
    assert doc["cache_bytes"] > 0 and (tmp_path / "s.md").exists()
