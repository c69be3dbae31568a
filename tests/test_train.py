"""python -m titans_mlx.train: a run that loads and generates, exact resume, Ctrl-C, NaN stop, accumulation, bad input.

Expected values come from independent paths: a resumed run must equal an uninterrupted one, K micro-batches of B/K
one batch of B, and so on; none are our own outputs pasted back. Subprocesses only where the process boundary is
what is tested (Ctrl-C, exit status, stderr).
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

from titans_mlx import load
from titans_mlx.io import save_model
from titans_mlx.mac import Model, ModelArgs
from titans_mlx.tokenizer import ByteTokenizer
from titans_mlx.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    num_tokens=256, dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
    neural_memory_layers=[2], dim_head=16, heads=2, num_residual_streams=1, sliding_window_attn=True,
    neural_memory_kwargs={"dim_head": 16, "heads": 2},
)
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
    "was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there "
    "be light: and there was light. And God saw the light, that it was good: and God divided the light from the "
    "darkness. "
) * 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_inputs")
    (d / "mac.json").write_text(json.dumps(CONFIG))
    (d / "corpus.txt").write_text(TEXT)
    return d


def train(files, out, *extra, data=None, config=True) -> int:
    argv = ["--data", str(data or files / "corpus.txt"), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--val-batches", "0", "--steps-per-report", "1", *map(str, extra)]
    if config and "--model" not in argv:
        argv = ["--config", str(files / "mac.json"), *argv]
    return main(argv)


def weights(path) -> dict:
    return mx.load(str(Path(path) / "model.safetensors"))


def max_relative_difference(a_dir, b_dir) -> float:
    """max over tensors of max|a - b| / max|b|."""
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    return max((mx.abs(a[k] - b[k]).max() / mx.maximum(mx.abs(b[k]).max(), 1e-30)).item() for k in b)


def global_relative_difference(a_dir, b_dir) -> float:
    """|a - b| / |b| over all weights as one vector."""
    a, b = weights(a_dir), weights(b_dir)
    num = sum(mx.sum(mx.square(a[k] - b[k])).item() for k in b)
    return (num / sum(mx.sum(mx.square(b[k])).item() for k in b)) ** 0.5


def saved_step(out) -> int:
    return json.loads((Path(out) / "training_state" / "state.json").read_text())["step"]


# ---- a run ----------------------------------------------------------------------------------------------------------


def test_run_writes_a_model_dir_that_loads_and_generates(files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train(files, out, "--iters", 12, "--learning-rate", 3e-3, "--warmup", 2, "--val-batches", 2,
               "--steps-per-eval", 6, "--steps-per-report", 4, "--save-every", 5)
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "Iter 4: Train loss" in stdout and "Tokens/sec" in stdout and "Peak mem" in stdout
    assert "Iter 6: Val loss" in stdout
    model, tokenizer = load(out)
    assert isinstance(tokenizer, ByteTokenizer) and model.args.dim == 32
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    assert train_steps == [4, 8, 12] and [s for s, _ in val] == [0, 6, 12]
    assert val[-1][1] < val[0][1] - 0.5  # it learns: the text repeats
    assert all(r["learning_rate"] > 0 and r["tokens_per_second"] > 0 for r in log if "train_loss" in r)
    assert saved_step(out) == 12
    try:
        import matplotlib  # noqa: F401

        assert (out / "loss_curve.png").stat().st_size > 1000
    except ImportError:
        assert not (out / "loss_curve.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging directories left behind

    from titans_mlx.generate import main as generate

    assert generate(["--model", str(out), "--prompt", "And God", "--max-tokens", "8", "--verbose", "false"]) == 0


def test_data_formats_jsonl_and_txt_directory(files, tmp_path):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    lines = [json.dumps({"text": TEXT[i : i + 300]}) for i in range(0, len(TEXT), 300)]
    (jsonl / "train.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    (jsonl / "valid.jsonl").write_text("\n".join(lines[-2:]) + "\n")
    txt = tmp_path / "txt"
    (txt / "sub").mkdir(parents=True)
    (txt / "a.txt").write_text(TEXT[:1500])
    (txt / "sub" / "b.txt").write_text(TEXT[1500:])
    for data in (jsonl, txt):
        assert train(files, tmp_path / f"out_{data.name}", "--iters", 2, "--val-batches", 1, data=data) == 0


def test_packing_is_consecutive_and_batches_are_a_function_of_seed_and_index():
    from titans_mlx.train_data import Split, Windows, train_samples

    windows = Windows(Split(np.arange(100, dtype=np.int32)), seq_len=8)
    assert windows.count == 12 and list(windows[1][0]) == list(range(8, 17))  # windows overlap by the shifted target
    assert np.array_equal(windows[1][1], np.ones(8))  # text: every target counts
    first, first_weights = train_samples(windows, seed=3, first=0, count=30)
    assert first_weights.shape == (30, 8)
    assert sorted(map(tuple, first[:12])) == sorted(tuple(windows[i][0]) for i in range(12))  # one epoch = all
    assert np.array_equal(train_samples(windows, seed=3, first=7, count=5)[0], first[7:12])
    assert not np.array_equal(train_samples(windows, seed=4, first=0, count=12)[0], first[:12])


def test_prompt_completion_records_are_whole_samples_weighted_by_part(tmp_path):
    from titans_mlx.train_data import Windows, read_corpus

    d = tmp_path / "data"
    d.mkdir()
    records = [{"text": "a" * 20}, {"prompt": "The key is 42. Key?", "completion": " 42"}, {"text": "b" * 20}]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    corpus = read_corpus(d, ByteTokenizer(), seq_len=32, want_valid=False)
    windows = Windows(corpus.train, 32, prompt_weight=0.1, completion_weight=5.0)
    # the two texts are packed (20 + EOS + 20 bytes: one window of 33), the record stands alone
    assert windows.count == 2
    ids, weights = windows[1]
    prompt, answer = b"The key is 42. Key?", b" 42"
    assert bytes(ids[: len(prompt) + 3].tolist()) == prompt + answer and not ids[len(prompt) + 3:].any()
    # target j predicts ids[j + 1]: prompt bytes 0.1, the answer's three bytes 5, the padding 0
    expected = np.zeros(32)
    expected[: len(prompt) - 1] = 0.1
    expected[len(prompt) - 1 : len(prompt) + 2] = 5.0
    assert np.allclose(weights, expected)


def test_weighted_loss_is_the_weighted_mean_of_per_target_cross_entropy():
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict({**CONFIG, "model_type": "titans_mac"}))
    ids = mx.array(np.random.default_rng(0).integers(0, 256, (2, 21)))
    weights = mx.array(np.random.default_rng(1).uniform(0, 1, (2, 20)).astype(np.float32))
    logits = np.array(model(ids[:, :-1]), dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, np.array(ids[:, 1:])[..., None], -1)[..., 0]
    w = np.array(weights, dtype=np.float64)
    assert abs(model.loss(ids, weights).item() - (nll * w).sum() / w.sum()) <= 1e-5 * nll.mean()
    assert abs(model.loss(ids).item() - nll.mean()) <= 1e-5 * nll.mean()


def test_answer_only_training_runs_and_refuses_records_longer_than_a_sample(files, tmp_path, capsys):
    d = tmp_path / "records"
    d.mkdir()
    lines = [json.dumps({"prompt": "The key is 123. Key?", "completion": " 123"})] * 6
    (d / "train.jsonl").write_text("\n".join(lines + [json.dumps({"text": TEXT})]))
    (d / "valid.jsonl").write_text(json.dumps({"text": TEXT[:400]}))
    assert train(files, tmp_path / "out", "--iters", 2, "--val-batches", 1, "--mask-prompt", data=d) == 0
    (d / "train.jsonl").write_text(json.dumps({"prompt": "x" * 40, "completion": " 1"}))
    capsys.readouterr()
    assert train(files, tmp_path / "out2", "--iters", 2, data=d) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 1" in err and "42 tokens" in err and not (tmp_path / "out2").exists()


def test_model_continues_from_a_model_dir(files, tmp_path):
    source = tmp_path / "source"
    config = {**CONFIG, "model_type": "titans_mac"}
    mx.random.seed(1)
    save_model(source, Model(ModelArgs.from_dict(config)), config, ByteTokenizer())
    out = tmp_path / "continued"
    assert train(files, out, "--model", source, "--iters", 2, "--seq-len", 16) == 0
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    before, after = weights(source), weights(out)
    assert 0 < global_relative_difference(out, source) < 0.1  # trained from the source's weights, not a fresh init
    assert before.keys() == after.keys()


def test_a_failed_save_leaves_the_previous_checkpoint(files, tmp_path, monkeypatch, capsys):
    import titans_mlx.train_state as train_state

    out = tmp_path / "run"
    saves = []

    def plot(log, path):  # the second checkpoint fails half-way through being staged
        saves.append(path)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return False

    monkeypatch.setattr(train_state, "plot_losses", plot)
    assert train(files, out, "--iters", 3, "--seq-len", 16, "--save-every", 1) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the checkpoint" in err[0] and "No space left" in err[0], err
    assert saved_step(out) == 1 and load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- resume ---------------------------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(files, tmp_path):
    flags = ["--lr-schedule", "constant", "--warmup", 3, "--save-every", 0, "--grad-clip", 0.5]
    assert train(files, tmp_path / "a", "--iters", 4, *flags) == 0
    assert saved_step(tmp_path / "a") == 4
    assert train(files, tmp_path / "a", "--iters", 7, "--resume", *flags) == 0
    assert train(files, tmp_path / "b", "--iters", 7, *flags) == 0
    assert saved_step(tmp_path / "a") == 7
    assert max_relative_difference(tmp_path / "a", tmp_path / "b") <= 1e-6
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8))
    opt_a = mx.load(str(tmp_path / "a" / "training_state" / "optimizer.safetensors"))
    opt_b = mx.load(str(tmp_path / "b" / "training_state" / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and opt_a["step"].item() == 7
    assert max((mx.abs(opt_a[k] - opt_b[k]).max()).item() for k in opt_b if k != "step") <= 1e-6


def test_a_state_saved_before_an_option_existed_resumes(files, tmp_path):
    # runs saved by an earlier titans-mlx have no entry for options added since (paper_order, absolute_positions)
    assert train(files, tmp_path / "a", "--iters", 2, "--save-every", 0) == 0
    state_file = tmp_path / "a" / "training_state" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("paper_order", "absolute_positions"):
        assert state["config"].pop(key) in (False, True)
    state_file.write_text(json.dumps(state))
    assert train(files, tmp_path / "a", "--iters", 3, "--resume", "--save-every", 0) == 0
    assert saved_step(tmp_path / "a") == 3


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(files, tmp_path):
    # cosine schedule over --iters: the interrupted + resumed run must follow the same learning rates
    flags = ["--iters", 60, "--warmup", 4, "--seq-len", 16, "--batch-size", 2]
    out = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "titans_mlx.train", "--config", str(files / "mac.json"), "--data",
            str(files / "corpus.txt"), "--out", str(out), "--val-batches", "0", "--steps-per-report", "1",
            *map(str, flags)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Iter 3:"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "[interrupted] checkpoint of step" in stderr, stderr
    stopped = saved_step(out)
    assert 3 <= stopped < 60
    load(out)  # the interrupted checkpoint is a model dir
    assert train(files, out, "--resume", *flags) == 0
    assert train(files, tmp_path / "uninterrupted", *flags) == 0
    difference = max_relative_difference(out, tmp_path / "uninterrupted")
    assert difference <= 1e-6, f"stopped at step {stopped}: {difference}"


# ---- the step -------------------------------------------------------------------------------------------------------


def test_accumulation_equals_one_big_batch(files, tmp_path):
    # 2 micro-batches of 2 hold the same samples as one batch of 4. The gradients agree to float32 rounding, which
    # Adam's first steps can turn into a move of about lr either way on a weight whose gradient is that small, so
    # the comparison uses a small learning rate and the weights as one vector.
    flags = ["--iters", 3, "--learning-rate", 1e-4]
    assert train(files, tmp_path / "big", "--batch-size", 4, *flags) == 0
    assert train(files, tmp_path / "acc", "--batch-size", 2, "--grad-accumulation-steps", 2, *flags) == 0
    assert global_relative_difference(tmp_path / "acc", tmp_path / "big") <= 1e-5
    assert train(files, tmp_path / "half", "--batch-size", 2, *flags) == 0  # and it is not just any run
    assert global_relative_difference(tmp_path / "half", tmp_path / "big") > 1e-3


def test_grad_checkpoint_gives_the_same_weights(files, tmp_path):
    flags = ["--iters", 2, "--seq-len", 16]
    assert train(files, tmp_path / "plain", *flags) == 0
    assert train(files, tmp_path / "ckpt", "--grad-checkpoint", *flags) == 0
    assert max_relative_difference(tmp_path / "ckpt", tmp_path / "plain") <= 1e-6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "nan"
    # a learning rate of 1e30 makes the first update's weights overflow the logits at step 2
    rc = train(files, out, "--iters", 5, "--learning-rate", 1e30, "--grad-clip", 0, "--lr-schedule", "constant",
               "--save-every", 1, "--seq-len", 16)
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at step 2" in err[0] and "checkpoint of step 1" in err[0], err
    assert saved_step(out) == 1
    assert all(bool(mx.all(mx.isfinite(w)).item()) for w in weights(out).values())


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train(files, out, "--iters", 1, "--seq-len", 16) == 0
    return out


def _bad_cases(files, tmp: Path, trained: Path):
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp / "no_txt").mkdir()
    (tmp / "no_txt" / "notes.md").write_text(TEXT)
    (tmp / "no_valid").mkdir()
    (tmp / "no_valid" / "train.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    (tmp / "bad_jsonl").mkdir()
    (tmp / "bad_jsonl" / "train.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + '{"txt": "x"}\n')
    (tmp / "bad_jsonl" / "valid.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    (tmp / "typo.json").write_text(json.dumps({**CONFIG, "dimm": 32}))
    (tmp / "bad_depth.json").write_text(json.dumps({**CONFIG, "depth": 0}))
    (tmp / "not_json.json").write_text("{num_tokens: 256")
    (tmp / "other.json").write_text(json.dumps({**CONFIG, "dim": 48}))
    (tmp / "small_vocab.json").write_text(json.dumps({**CONFIG, "num_tokens": 100}))
    model_dir = tmp / "bytes_model"
    mx.random.seed(0)
    save_model(model_dir, Model(ModelArgs.from_dict(CONFIG)), {**CONFIG, "model_type": "titans_mac"}, ByteTokenizer())
    from mlx_lm.utils import quantize_model

    quantized, qconfig = quantize_model(Model(ModelArgs.from_dict(CONFIG)), {**CONFIG, "model_type": "titans_mac"},
                                        32, 8)
    save_model(tmp / "quantized", quantized, qconfig, ByteTokenizer())
    not_model = tmp / "not_model"
    not_model.mkdir()
    (not_model / "keep.txt").write_text("mine")
    spm = _spm_model(tmp)
    corpus, cfg = str(files / "corpus.txt"), str(files / "mac.json")
    return {
        "missing data": (["--data", str(tmp / "nope.txt")], "no such file or directory"),
        "empty data file": (["--data", str(tmp / "empty.txt")], "is empty"),
        "directory without text": (["--data", str(tmp / "no_txt")], "no train.jsonl and no .txt files"),
        "non-UTF-8 text": (["--data", str(tmp / "latin1.txt")], "is not UTF-8 text"),
        "jsonl without valid.jsonl": (["--data", str(tmp / "no_valid"), "--val-batches", "1"], "no valid.jsonl"),
        "malformed jsonl line": (["--data", str(tmp / "bad_jsonl"), "--val-batches", "1"], "line 2"),
        "unknown config key": (["--config", str(tmp / "typo.json")], "'dimm' is not"),
        "config that cannot build": (["--config", str(tmp / "bad_depth.json")], "cannot build a model"),
        "config not JSON": (["--config", str(tmp / "not_json.json")], "invalid JSON"),
        "tokenizer larger than the model": (["--config", str(tmp / "small_vocab.json")], "256 tokens"),
        "seq-len below one segment": (["--seq-len", "4"], "shorter than one segment"),
        "quantized model": (["--model", str(tmp / "quantized")], "is quantized"),
        "tokenizer mismatch": (["--model", str(model_dir), "--tokenizer", str(spm)], "does not match the tokenizer"),
        "resume without OUT": (["--resume", "--out", str(tmp / "absent")], "does not exist"),
        "resume without state": (["--resume", "--out", str(model_dir)], "no saved training state"),
        "resume from another config": (["--resume", "--out", str(trained), "--config", str(tmp / "other.json")],
                                       "another config (dim"),
        "resume with another batch": (["--resume", "--out", str(trained), "--batch-size", "2"], "--batch-size 2"),
        "OUT holds a model": (["--out", str(model_dir)], "already exists"),
        "force over a non-model dir": (["--out", str(not_model), "--force"], "not a model directory"),
        "resume and force": (["--resume", "--force", "--out", str(trained)], "give one of them"),
        "negative prompt loss weight": (["--prompt-loss-weight", "-1"], "--prompt-loss-weight must be >= 0"),
        "mask-prompt and a weight": (["--mask-prompt", "--prompt-loss-weight", "0.5"], "give one of them"),
        "zero completion loss weight": (["--completion-loss-weight", "0"], "--completion-loss-weight must be > 0"),
    }, corpus, cfg


def _spm_model(tmp: Path) -> Path:
    import io

    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(". ")), model_writer=buf,
                                             vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    path = tmp / "t.model"
    path.write_bytes(buf.getvalue())
    return path


BAD = ["missing data", "empty data file", "directory without text", "non-UTF-8 text", "jsonl without valid.jsonl",
       "malformed jsonl line", "unknown config key", "config that cannot build", "config not JSON",
       "tokenizer larger than the model", "seq-len below one segment", "quantized model", "tokenizer mismatch", "resume without OUT",
       "resume without state", "resume from another config", "resume with another batch", "OUT holds a model",
       "force over a non-model dir", "resume and force", "negative prompt loss weight", "mask-prompt and a weight",
       "zero completion loss weight"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(case, files, trained, tmp_path, capsys):
    cases, corpus, cfg = _bad_cases(files, tmp_path, trained)
    capsys.readouterr()
    extra, message = cases[case]
    argv = ["--data", corpus, "--out", str(tmp_path / "out"), "--seq-len", "16", "--iters", "1", "--val-batches", "0"]
    if "--config" not in extra and "--model" not in extra:
        argv = ["--config", cfg, *argv]
    before = sorted(str(p) for p in tmp_path.rglob("*")), sorted(str(p) for p in trained.parent.rglob("*"))
    before_state = (trained / "training_state" / "state.json").read_text()
    assert main(argv + extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    after = sorted(str(p) for p in tmp_path.rglob("*")), sorted(str(p) for p in trained.parent.rglob("*"))
    assert after == before and (trained / "training_state" / "state.json").read_text() == before_state


def test_force_replaces_a_model_dir(files, tmp_path):
    out = tmp_path / "out"
    mx.random.seed(0)
    config = {**CONFIG, "dim": 48, "model_type": "titans_mac"}
    save_model(out, Model(ModelArgs.from_dict(config)), config, ByteTokenizer())
    assert train(files, out, "--iters", 1, "--seq-len", 16, "--force") == 0
    assert load(out)[0].args.dim == 32


def test_cli_process_exit_status_and_one_line(files, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    base = [sys.executable, "-m", "titans_mlx.train", "--config", str(files / "mac.json"), "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run(base + ["--data", str(tmp_path / "latin1.txt")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "not UTF-8 text" in bad.stderr
    flags = subprocess.run(base + ["--iters", "3"], capture_output=True, text=True, env=env)
    assert flags.returncode == 2 and flags.stderr.strip().count("\n") == 0 and "--data" in flags.stderr
    assert not (tmp_path / "o").exists()
