"""Stock mlx-lm runs our model directories: `python -m mlx_lm generate --trust-remote-code` prints the same greedy
text as `python -m titans_mlx.generate` (both real CLIs, as subprocesses)."""

import io
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "titans_mlx" / "demo_model"
RULE = "=" * 10
MAX_TOKENS = 20
# 252 bytes: several of the demo model's 32-byte segments, so its memory stores before the first generated token
PROMPT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
          "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
          "said, Let there be light: and there was light.")

pytest.importorskip("mlx_lm")


def run(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=300)


def generated_text(res) -> str:
    """The text between the two ========== lines that both CLIs print around what they generate."""
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stderr[-3000:]}"
    out = res.stdout
    start = out.index(RULE + "\n") + len(RULE) + 1
    end = out.rindex("\n" + RULE + "\n")
    return out[start:end]


def both(model_dir, prompt):
    theirs = run("mlx_lm", "generate", "--model", model_dir, "--trust-remote-code", "--prompt", prompt,
                 "--max-tokens", MAX_TOKENS, "--temp", 0)
    ours = run("titans_mlx.generate", "--model", model_dir, "--prompt", prompt, "--max-tokens", MAX_TOKENS,
               "--temp", 0)
    text = generated_text(theirs)
    assert f"Generation: {MAX_TOKENS} tokens" in theirs.stdout and f"Generation: {MAX_TOKENS} tokens" in ours.stdout
    return text, generated_text(ours)


def test_demo_model_in_mlx_lm():
    assert len(PROMPT.encode("utf-8")) > 200 and "\\" not in PROMPT  # mlx-lm turns a literal \n into a newline
    theirs, ours = both(DEMO, PROMPT)
    assert theirs == ours and len(theirs.encode("utf-8")) == MAX_TOKENS  # one byte a token, none held back


def test_mlx_lm_refuses_without_trust_remote_code():
    res = run("mlx_lm", "generate", "--model", DEMO, "--prompt", "hi", "--max-tokens", 1)
    assert res.returncode != 0 and "trust_remote_code" in res.stderr  # mlx-lm's own refusal to run model_file


def test_sentencepiece_model_in_mlx_lm(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from titans_mlx.io import save_model
    from titans_mlx.mac import Model, ModelArgs
    from titans_mlx.tokenizer import SentencePieceTokenizer

    lines = ["The quick brown fox jumps over the lazy dog.", "Hello world! A naive cafe, numbers 12345."] * 20
    buf = io.BytesIO()
    # no byte pieces (whose invalid UTF-8 the two replace differently) and no dummy prefix
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=60,
                                   hard_vocab_limit=False, add_dummy_prefix=False, remove_extra_whitespaces=False,
                                   minloglevel=2)
    (tmp_path / "t.model").write_bytes(buf.getvalue())
    tokenizer = SentencePieceTokenizer(tmp_path / "t.model")
    special = [tokenizer._sp.unk_id(), tokenizer.bos_token_id, tokenizer.eos_token_id]
    config = dict(num_tokens=len(tokenizer), dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2,
                  num_longterm_mem_tokens=2, neural_memory_layers=[2], dim_head=16, heads=2, num_residual_streams=1,
                  sliding_window_attn=True, neural_memory_kwargs={"dim_head": 16, "heads": 2}, model_type="titans_mac")
    mx.random.seed(4)
    model = Model(ModelArgs.from_dict(config))
    model.token_emb.weight = model.token_emb.weight * 8  # a random model less stuck on one token ("3rdTveTiHiH...")
    # logit 0 for <unk>, <s>, </s>: greedy takes one only if every other logit is negative. They decode
    # differently (sentencepiece drops control pieces and writes <unk> as " \u2047 ", transformers writes names)
    model.to_logits.weight[mx.array(special)] = 0
    out = save_model(tmp_path / "spm_mac", model, config, tokenizer)
    prompt = " ".join(lines[:4])
    assert len(tokenizer.encode(prompt)) > 2 * config["segment_len"]
    theirs, ours = both(out, prompt)
    assert theirs == ours and theirs
