"""titans_mlx.generate: library, sessions (save/load state), mlx-lm interop, CLI and its bad inputs.

Expected values come from the model's own one-call forward (the independent path): generation through the cache,
in prefill blocks and across saved sessions must reproduce it.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from titans_mlx.generate import (
    GenerationError,
    GenerationState,
    load_state,
    main,
    save_state,
    stream_generate,
    generate,
)
from titans_mlx.io import save_model
from titans_mlx.mac import Model, ModelArgs
from titans_mlx.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    num_tokens=256, dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
    neural_memory_layers=[2], dim_head=16, heads=2, num_residual_streams=1, sliding_window_attn=True,
    neural_memory_kwargs={"dim_head": 16, "heads": 2},
)
PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form."


def make_model(seed=0, **overrides):
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict({**CONFIG, **overrides}))
    # a random init gives nearly uniform logits; sharpen them so greedy decoding is far from ties
    model.to_logits.weight = model.to_logits.weight * 30
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("gen") / "model"
    save_model(path, model, dict(CONFIG, model_type="titans_mac"), tok)
    return path


def reference(model, tokens):
    """log-probs of every next token from one uncached call."""
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def run(model, tok, prompt, n, **kw):
    out = list(stream_generate(model, tok, prompt, max_tokens=n, **kw))
    return out


# ---- library ---------------------------------------------------------------------------------------------------------


def test_stream_generate_matches_one_call_forward(model, tok):
    out = run(model, tok, PROMPT, 24, prefill_step_size=16)
    fields = ("text", "token", "logprobs", "prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps",
              "peak_memory", "finish_reason")
    assert all(hasattr(out[0], f) for f in fields)
    assert [r.finish_reason for r in out] == [None] * 23 + ["length"]
    assert [r.generation_tokens for r in out] == list(range(1, 25))
    assert out[-1].prompt_tokens == len(PROMPT)
    tokens = [r.token for r in out]
    assert "".join(r.text for r in out) == tok.decode(tokens)
    ref = reference(model, tok.encode(PROMPT) + tokens)
    p = len(PROMPT)
    # greedy: each token is the argmax of the one-call forward at its position, with the same log-probs
    assert tokens == ref[p - 1 : p - 1 + 24].argmax(-1).tolist()
    got = np.stack([np.array(r.logprobs) for r in out])
    np.testing.assert_allclose(got, ref[p - 1 : p - 1 + 24], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("step", [1, 8, 24, 4096])
def test_prefill_block_size_does_not_change_the_result(model, tok, step):
    out = run(model, tok, PROMPT, 3, prefill_step_size=step)
    ref = reference(model, tok.encode(PROMPT))[-1]
    np.testing.assert_allclose(np.array(out[0].logprobs), ref, atol=1e-4, rtol=1e-4)


def test_generate_returns_text_and_prints_mlx_lm_stats(model, tok, capsys):
    text = generate(model, tok, PROMPT, max_tokens=5, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "=" * 10 and lines[-4] == "=" * 10
    assert lines[-3].startswith(f"Prompt: {len(PROMPT)} tokens, ") and lines[-3].endswith(" tokens-per-sec")
    assert lines[-2].startswith("Generation: 5 tokens, ")
    assert lines[-1].startswith("Peak memory: ") and lines[-1].endswith(" GB")
    assert len(text) > 0


def test_eos_stops(model, tok):
    first = run(model, tok, PROMPT, 4)[0].token
    eos_tok = ByteTokenizer(eos_token_id=first)
    out = run(model, eos_tok, PROMPT, 10)
    assert len(out) == 1 and out[0].finish_reason == "stop" and out[0].text == ""


def test_sampling_seeded_and_min_p(model, tok):
    from mlx_lm.sample_utils import make_sampler

    def tokens(seed):
        mx.random.seed(seed)
        return [r.token for r in run(model, tok, PROMPT, 12, sampler=make_sampler(1.5, min_p=0.1))]

    assert tokens(3) == tokens(3)
    # min-p 0.1 only ever samples tokens with p >= 0.1 * p_max (titans-pytorch's min_p_filter)
    out = run(model, tok, PROMPT, 12, sampler=make_sampler(1.5, min_p=0.1))
    for r in out:
        lp = np.array(r.logprobs)
        assert lp[r.token] >= lp.max() + np.log(0.1) - 1e-5


# ---- sessions --------------------------------------------------------------------------------------------------------


def test_save_load_state_equals_one_go(model, tok, tmp_path):
    a, b = PROMPT[:45], " And God said, Let there be light."
    state = GenerationState.new(model)
    first = [r.token for r in run(model, tok, a, 10, state=state, prefill_step_size=16)]
    save_state(tmp_path / "s.safetensors", state, model, tok)
    assert state.tokens == len(a) + 10

    # continue with a new prompt: equals prompt a + generated + b in one go
    loaded = load_state(tmp_path / "s.safetensors", model, tok)
    assert loaded.tokens == state.tokens and loaded.history == state.history
    cont = run(model, tok, b, 8, state=loaded, prefill_step_size=16)
    one_go = run(model, tok, tok.encode(a) + first + tok.encode(b), 8)
    assert [r.token for r in cont] == [r.token for r in one_go]
    np.testing.assert_allclose(np.array(cont[0].logprobs), np.array(one_go[0].logprobs), atol=1e-4, rtol=1e-4)

    # continue with no prompt: equals one uninterrupted run
    resumed = run(model, tok, "", 8, state=load_state(tmp_path / "s.safetensors", model, tok))
    whole = [r.token for r in run(model, tok, a, 18)]
    assert first + [r.token for r in resumed] == whole


def test_prefill_only_then_resume(model, tok, tmp_path):
    state = GenerationState.new(model)
    out = run(model, tok, PROMPT, 0, state=state)
    assert len(out) == 1 and out[0].generation_tokens == 0 and out[0].token is None
    save_state(tmp_path / "p.safetensors", state, model, tok)
    resumed = run(model, tok, "", 5, state=load_state(tmp_path / "p.safetensors", model, tok))
    assert [r.token for r in resumed] == [r.token for r in run(model, tok, PROMPT, 5)]


def test_state_from_another_model_is_refused(model, tok, tmp_path):
    state = GenerationState.new(model)
    run(model, tok, PROMPT, 2, state=state)
    save_state(tmp_path / "s.safetensors", state, model, tok)
    with pytest.raises(GenerationError, match="another model"):
        load_state(tmp_path / "s.safetensors", make_model(seed=1), tok)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GenerationError, match="not a safetensors state file"):
        load_state(tmp_path / "junk.safetensors", model, tok)
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"a": mx.zeros(2)})
    with pytest.raises(GenerationError, match="not a titans-mlx state file"):
        load_state(tmp_path / "other.safetensors", model, tok)


def test_empty_prompt_without_state_is_an_error(model, tok):
    with pytest.raises(GenerationError, match="empty"):
        run(model, tok, "", 3)
    with pytest.raises(GenerationError, match="max_tokens"):
        run(model, tok, PROMPT, -2)


# ---- mlx-lm interop --------------------------------------------------------------------------------------------------


def test_runs_under_mlx_lm_stream_generate(model, tok):
    import mlx_lm

    theirs = list(mlx_lm.stream_generate(model, tok, PROMPT, max_tokens=12))
    ours = run(model, tok, PROMPT, 12)
    assert [r.token for r in theirs] == [r.token for r in ours]
    assert "".join(r.text for r in theirs) == "".join(r.text for r in ours)
    assert theirs[-1].finish_reason == "length"
    from titans_mlx.tokenizer import to_mlx_lm

    assert mlx_lm.generate(model, to_mlx_lm(tok), PROMPT, max_tokens=12) == "".join(r.text for r in ours)


# ---- command line ----------------------------------------------------------------------------------------------------


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "titans_mlx.generate", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, **kw)


def test_cli_generates_saves_and_resumes(model_dir, model, tok, tmp_path):
    state = tmp_path / "cli.safetensors"
    r = cli("--model", model_dir, "--prompt", PROMPT[:40], "--max-tokens", 6, "--save-state", state)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "=" * 10
    assert lines[-5] == "=" * 10
    assert lines[-4].startswith("Prompt: 40 tokens, ") and lines[-3].startswith("Generation: 6 tokens, ")
    assert lines[-2].startswith("Peak memory: ")
    r2 = cli("--model", model_dir, "--load-state", state, "--prompt", PROMPT[40:], "--max-tokens", 5,
             "--verbose", "false")
    assert r2.returncode == 0, r2.stderr
    first = [r.token for r in run(model, tok, PROMPT[:40], 6)]
    expected = generate(model, tok, tok.encode(PROMPT[:40]) + first + tok.encode(PROMPT[40:]), max_tokens=5)
    assert r2.stdout == expected


def test_cli_prompt_from_stdin_and_file(model_dir, tmp_path, model, tok, capsys, monkeypatch):
    # in-process: the same code path as the subprocess, without another interpreter start
    import io

    expected = generate(model, tok, "Let there be light", max_tokens=4)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Let there be light"))
    assert main(["--model", str(model_dir), "--prompt", "-", "-m", "4", "--verbose", "false"]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "p.txt").write_text("Let there be light")
    assert main(["--model", str(model_dir), "--prompt-file", str(tmp_path / "p.txt"), "-m", "4",
                 "--verbose", "false"]) == 0
    assert capsys.readouterr().out == expected


def _bad(capsys, *argv):
    code = main([*map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_cli_bad_inputs(model_dir, tmp_path, capsys, tok, model):
    assert "does not exist" in _bad(capsys, "--model", tmp_path / "nope", "--prompt", "x")
    (tmp_path / "empty").mkdir()
    assert "cannot load model" in _bad(capsys, "--model", tmp_path / "empty", "--prompt", "x")
    weird = tmp_path / "weird"
    save_model(weird, model, dict(CONFIG, model_type="titans_mac"), tok)
    (weird / "tokenizer.json").write_text(json.dumps({"type": "wordpiece"}))
    assert "tokenizer" in _bad(capsys, "--model", weird, "--prompt", "x")
    assert "does not exist" in _bad(capsys, "--model", model_dir, "--prompt-file", tmp_path / "missing.txt")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    assert "binary" in _bad(capsys, "--model", model_dir, "--prompt-file", tmp_path / "bin.dat")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in _bad(capsys, "--model", model_dir, "--prompt-file", tmp_path / "latin1.txt")
    assert "--max-tokens" in _bad(capsys, "--model", model_dir, "--max-tokens", -1)
    other = make_model(seed=5)
    state = GenerationState.new(other)
    run(other, tok, "abc", 1, state=state)
    save_state(tmp_path / "foreign.safetensors", state, other, tok)
    assert "another model" in _bad(capsys, "--model", model_dir, "--load-state", tmp_path / "foreign.safetensors")
    assert "does not exist" in _bad(capsys, "--model", model_dir, "--load-state", tmp_path / "none.safetensors")


def test_cli_bad_input_as_subprocess_has_no_traceback(tmp_path):
    r = cli("--model", tmp_path / "nope", "--prompt", "x")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_ctrl_c_stops_cleanly(model_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "titans_mlx.generate", "--model", str(model_dir), "--prompt",
                             PROMPT, "--max-tokens", "1000000", "--temp", "1.0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline() == b"=" * 10 + b"\n"
        proc.stdout.read(20)  # generation is under way
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err


# ---- the bundled demo model ------------------------------------------------------------------------------------------


def test_bundled_demo_model_is_the_default(capsys):
    from titans_mlx.generate import DEFAULT_MODEL
    from titans_mlx.io import load

    assert main(["--prompt", "And God said", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-3].startswith("Prompt: 12 tokens, ") and lines[-2].startswith("Generation: 12 tokens, ")
    model, tok = load(DEFAULT_MODEL)
    text = "".join(r.text for r in stream_generate(model, tok, "And God said", 12))
    assert out.startswith("=" * 10 + "\n" + text + "\n" + "=" * 10 + "\n")
