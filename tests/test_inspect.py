"""python -m titans_mlx.inspect: the recorded numbers, the outputs, the page in a real browser, bad inputs.

Expected values come from independent paths: the surprises and step sizes from a lone NeuralMemory called once on
the whole layer input (NeuralMemory's return_surprises), which the test builds itself from the model's embeddings
(the first memory layer) or from one plain call of the layer before (the second); the forget gate from the chunk's
mean store token through to_decay_factor; the weights after each chunk from return_updates; the final weight norm from
the model's cache after one call. inspect reads the document in small prefill blocks, so block-wise recording must
give the one-call numbers.

The browser test runs Debian's chromium headless (``.ci/run`` installs it). Without chromium it is skipped on a
developer's machine and fails when the environment variable CI is set, so that CI cannot pass without it.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from titans_mlx.cache import memory_states
from titans_mlx.inspect import changed_number, main, needle_tokens, plant, token_texts
from titans_mlx.inspect_page import PAGE_TOKENS
from titans_mlx.io import save_model
from titans_mlx.mac import Model, ModelArgs
from titans_mlx.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
# two memory layers with two heads each; memory chunks of 6 positions against windows of 8 + 2 (not aligned)
CONFIG = dict(
    num_tokens=256, dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
    neural_memory_layers=[1, 2], neural_memory_segment_len=6, dim_head=16, heads=2, num_residual_streams=1,
    sliding_window_attn=True,
    # a forget gate of 0.0025 per chunk (a random one, 0.5, forgets a needle within a few chunks)
    neural_memory_kwargs={"dim_head": 16, "heads": 2, "init_adaptive_step_bias": -1.0, "init_decay_bias": -6.0},
)
LOOKAHEAD = dict(CONFIG, neural_memory_segment_len=10, neural_memory_batch_size=20, neural_memory_kwargs={
    "dim_head": 16, "heads": 2, "store_with_lookahead_value": True, "qk_rmsnorm": True, "post_rmsnorm": True})
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ")


def make_dir(path, config, seed=0, tokenizer=None):
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(path, model, dict(config, model_type="titans_mac"), tokenizer or ByteTokenizer())
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return {"plain": make_dir(root / "plain", CONFIG), "lookahead": make_dir(root / "lookahead", LOOKAHEAD)}


def run_inspect(*argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


# ---- the numbers -----------------------------------------------------------------------------------------------------


def layer_inputs(model, ids):
    """Each memory layer's input on the whole sequence in one uncached call, built here: the tokens with the
    long-term memory tokens after every segment, plus the positional embedding; the second layer's is the first
    layer's output."""
    S, M = model.args.segment_len, model.args.num_longterm_mem_tokens
    rows, t = [], 0
    while t < len(ids):
        seg = ids[t:t + S]
        rows += [model.token_emb.weight[i] for i in seg]
        t += len(seg)
        if t < len(ids):
            rows += [model.longterm_mems[j] for j in range(M)]
    x = mx.stack(rows)[None]
    x = x + model.axial_pos_emb(0, x.shape[1], x.dtype)
    second, *_ = model.layers[0](x, 0)
    return [x, second]


def value_positions(n_positions, chunk, lookahead):
    """Where each stored key's loss belongs: its own position, or with lookahead the next (the value's)."""
    out = []
    for c in range(n_positions // chunk):
        keys = range(chunk - 1) if lookahead else range(chunk)
        out += [c * chunk + j + (1 if lookahead else 0) for j in keys]
    return out


@pytest.mark.parametrize("kind", ["plain", "lookahead"])
def test_recorded_numbers_equal_the_lone_memory(model_dirs, tmp_path, kind, monkeypatch):
    from titans_mlx.io import load
    import titans_mlx.memory_step as memory_step

    # the inspected forward stores in the loop form (it records every chunk's weights); so do the references here
    monkeypatch.setattr(memory_step, "DUAL_FORM", False)

    doc = TEXT * 2  # 360 bytes: 37 segments, a partial last chunk
    out = tmp_path / "out"
    assert run_inspect("--model", model_dirs[kind], "--prompt", doc, "--out", out, "--format", "json",
                       "--prefill-step-size", "16") == 0
    rep = json.loads((out / "memory.json").read_text())
    model, tok = load(model_dirs[kind])
    ids = tok.encode(doc)
    assert rep["tokens"] == len(ids) and rep["token_ids"] == ids

    S, W = model.args.segment_len, model.window
    token_of = {p: (p // W) * S + p % W for p in range(model.positions_for(len(ids))) if p % W < S}
    cache = model.make_cache()
    model(mx.array(ids)[None], cache=cache)
    final = memory_states(cache)
    for i, (x, layer) in enumerate(zip(layer_inputs(model, ids), rep["layers"])):
        mem = model.layers[i].mem
        C, H = mem.chunk_size, mem.heads
        qkv = mx.stack([x, x, x])
        _, _, (losses, lrs), updates = mem(qkv, return_surprises=True, return_updates=True)
        losses, lrs = np.array(losses[0]), np.array(lrs[0])
        want_s, want_lr = np.full((H, len(ids)), np.nan), np.full((H, len(ids)), np.nan)
        for k, p in enumerate(value_positions(x.shape[1], C, kind == "lookahead")):
            if p in token_of:
                want_s[:, token_of[p]], want_lr[:, token_of[p]] = losses[:, k], lrs[:, k]
        got_s = np.array(layer["surprise"], dtype=np.float64)
        got_lr = np.array(layer["step_size"], dtype=np.float64)
        assert np.array_equal(np.isnan(got_s), np.isnan(want_s))
        assert np.isnan(got_s).sum() < got_s.size / 4
        np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_lr, want_lr, rtol=1e-4, atol=1e-7)

        # per chunk: forget gate from the chunk's mean normed store token, weights after each chunk from
        # return_updates, the update as what the chunk added to the decayed weights
        n_chunks = x.shape[1] // C
        normed = mx.fast.rms_norm(x[0, :n_chunks * C], mem.store_norm.weight, mx.finfo(mx.float32).eps)
        rep_ = normed.reshape(n_chunks, C, -1).mean(axis=1)
        alpha = np.array(mx.sigmoid(mem.to_decay_factor(rep_))).T  # (H, chunks)
        np.testing.assert_allclose(np.array(layer["forget"]), alpha, rtol=1e-4, atol=1e-7)
        weights = [np.array(u).reshape(H, n_chunks + 1, -1) for u in updates]  # (BH, chunks + 1, ...)
        flat = np.concatenate(weights, axis=-1)
        np.testing.assert_allclose(np.array(layer["weight_norm"]), np.linalg.norm(flat[:, 1:], axis=-1), rtol=1e-4)
        added = flat[:, 1:] - (1 - alpha[..., None]) * flat[:, :-1]
        np.testing.assert_allclose(np.array(layer["update_norm"]), np.linalg.norm(added, axis=-1), rtol=1e-3,
                                   atol=1e-5)
        # the last chunk's weights are the cache's at the end of the document
        last = np.concatenate([np.array(w).reshape(H, -1) for w in final[i].last_update], axis=-1)
        np.testing.assert_allclose(np.array(layer["weight_norm"])[:, -1], np.linalg.norm(last, axis=-1), rtol=1e-5)
        ends = [S * ((c + 1) * C // W) + min((c + 1) * C % W, S) for c in range(n_chunks)]
        assert layer["chunk_end_token"] == ends


def test_default_forward_unchanged(model_dirs, monkeypatch):
    """return_memory only adds outputs: the logits and the cache are the plain forward's (in the loop form of the
    store, which return_memory runs to record every chunk's weights; the dual form agrees to rounding)."""
    from titans_mlx.io import load
    import titans_mlx.memory_step as memory_step

    model, tok = load(model_dirs["lookahead"])
    ids = mx.array(tok.encode(TEXT))[None]
    dual = model(ids, cache=model.make_cache())
    monkeypatch.setattr(memory_step, "DUAL_FORM", False)
    plain_cache, traced_cache = model.make_cache(), model.make_cache()
    plain = model(ids, cache=plain_cache)
    traced, records = model(ids, cache=traced_cache, return_memory=True)
    assert np.array_equal(np.array(plain), np.array(traced))
    # across forms: the whole-model tolerance, as lookahead values with a TTT batch of two chunks make this random
    # model chaotic (test_mac's any-split says more)
    assert float(mx.abs(dual - plain).max() / mx.abs(plain).max()) <= 1e-4
    for a, b in zip(memory_states(plain_cache), memory_states(traced_cache)):
        assert all(np.array_equal(np.array(u), np.array(v)) for u, v in zip(a.last_update, b.last_update))
    assert [r is None for r in records] == [False, False]
    assert records[0]["retrieved"].shape == (1, model.positions_for(ids.shape[1]), model.args.dim)


def test_token_texts_join_to_the_text():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 ok"
    texts = token_texts(tok, tok.encode(text))
    assert "".join(texts) == text and len(texts) == len(text.encode())
    assert texts[tok.encode("naï").__len__() - 1] == "ï" and texts[2] == ""  # a character goes to its last byte


def test_plant_and_find_the_needle():
    doc = "First sentence here. Second one follows. Third one ends it."
    planted, at = plant(doc, "The pass key is 71432.", 0.4)
    assert planted == "First sentence here. The pass key is 71432. Second one follows. Third one ends it."
    assert planted[at:].startswith("The pass key")
    assert plant(doc, "N 1.", 0.0)[0] == "N 1. " + doc and plant(doc, "N 1.", 1.0)[0] == doc + " N 1."
    assert changed_number("The pass key is 71432.") == "The pass key is 26987."
    tok = ByteTokenizer()
    texts = token_texts(tok, tok.encode(planted))
    a, b = needle_tokens(texts, "The pass key is 71432.", at)
    assert "".join(texts[a:b]) == "The pass key is 71432."


def test_needle_mode(model_dirs, tmp_path):
    out = tmp_path / "out"
    doc = TEXT * 5  # 900 bytes; the needle at depth 0.3 is ~600 bytes before the question
    assert run_inspect("--model", model_dirs["plain"], "--prompt", doc, "--out", out, "--format", "json,html",
                       "--needle", "The pass key is 71432.", "--depth", "0.3", "--answer-tokens", "4") == 0
    rep = json.loads((out / "memory.json").read_text())
    nd = rep["needle"]
    a, b = nd["tokens"]
    assert "".join(rep["token_text"][a:b]) == "The pass key is 71432."
    assert 0.2 < a / rep["tokens"] < 0.4
    assert "".join(rep["token_text"]).endswith("What is the pass key? The pass key is")
    assert len(nd["answer_learning_ids"]) == len(nd["answer_frozen_ids"]) == 4 and nd["same_length_control"]
    for layer in nd["layers"]:
        # frozen, nothing is written, and the question is beyond attention's reach of the needle: the read cannot
        # depend on the pass key; learning, the memory carries it
        assert layer["read_change_frozen"] == 0.0
        assert layer["read_change_learning"] > 1e-6
        assert len(layer["surprise_needle"]) == 2
    assert (out / "memory.html").read_text().count("The pass key is 71432.") >= 1


# ---- the outputs -----------------------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self.data_json, self._in = [], [], None, None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in = dict(attrs).get("type", "js")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in == "application/json":
            self.data_json = (self.data_json or "") + data
        elif self._in == "js":
            self.scripts.append(data)


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_outputs_are_well_formed(model_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    doc = "<script>alert('x')</script> & </script><!-- " + TEXT
    result = subprocess.run([sys.executable, "-m", "titans_mlx.inspect", "--model", str(model_dirs["plain"]),
                             "--prompt", doc, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["memory.html", "memory.json", "memory.png"]

    rep = json.loads((out / "memory.json").read_text())
    assert "".join(rep["token_text"]) == doc
    assert [layer["layer"] for layer in rep["layers"]] == [1, 2]
    for layer in rep["layers"]:
        assert len(layer["surprise"]) == 2 and all(len(row) == rep["tokens"] for row in layer["surprise"])
        assert len(layer["forget"][0]) == len(layer["chunk_end_token"]) > 0

    page = (out / "memory.html").read_text()
    parser = _Tags()
    parser.feed(page)
    # self-contained: no external resources; the document is data, not markup
    assert not [t for t, a in parser.tags if t in ("link", "img", "iframe") or "src" in a or "href" in a]
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert page.count("<script") == 2 and "alert('x')</script>" not in page
    data = json.loads(parser.data_json)
    assert "".join(data["texts"]) == doc and len(data["series"]) == 4
    assert all(len(s["buckets"]) == rep["tokens"] for s in data["series"])

    width, height = png_size((out / "memory.png").read_bytes())
    assert width > 500 and height > 400


def test_png_without_matplotlib_is_one_line(model_dirs, tmp_path, monkeypatch, capsys):
    import titans_mlx.inspect as inspect_module

    monkeypatch.setattr(inspect_module, "_png_available", lambda: False)
    out = tmp_path / "out"
    assert run_inspect("--model", model_dirs["plain"], "--prompt", TEXT, "--out", out, "--format", "png") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --format png needs matplotlib")
    assert not out.exists()
    assert run_inspect("--model", model_dirs["plain"], "--prompt", TEXT, "--out", out) == 0  # default: no PNG
    assert sorted(p.name for p in out.iterdir()) == ["memory.html", "memory.json"]
    assert "note: matplotlib is not installed" in capsys.readouterr().err


# ---- in a browser ----------------------------------------------------------------------------------------------------


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI is set, so the browser test must run: .ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return found


def browse(page: Path, tmp_path: Path, *flags):
    exe = chromium()
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *flags, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def rendered_text(dom: str) -> str:
    m = re.search(r'<div id="text"[^>]*>(.*?)</div>', dom, re.S)
    assert m, "no #text element in the DOM"
    return m.group(1)


def page_errors(dom: str) -> str:
    """What the page's error handler wrote (window 'error' events), empty when the script ran cleanly."""
    m = re.search(r'<div id="errors">(.*?)</div>', dom, re.S)
    assert m, "no #errors element in the DOM"
    return m.group(1)


def console_errors(stderr: str) -> list:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)
            or "Uncaught" in line]


def test_page_in_a_real_browser(model_dirs, tmp_path):
    chromium()
    out = tmp_path / "out"
    doc = "<b>not bold</b> naïve café 日本語. " + TEXT
    assert run_inspect("--model", model_dirs["lookahead"], "--prompt", doc, "--out", out, "--format", "html",
                       "--needle", "The pass key is 71432.", "--depth", "0.5", "--answer-tokens", "2") == 0
    page = out / "memory.html"

    result = browse(page, tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'id="rendered"' in dom, "the page's script did not finish"
    assert console_errors(result.stderr) == [] and page_errors(dom) == ""
    text = rendered_text(dom)
    assert "&lt;b&gt;not bold&lt;/b&gt; naïve café 日本語." in re.sub(r"<[^>]+>", "", text)  # text, not markup
    assert "<b>" not in text
    assert 'class="b0' in text and "needle" in text and "The pass key is 71432." in re.sub(r"<[^>]+>", "", text)
    legend = re.search(r'<span id="legend">(.*?)</span>\s*</div>', dom, re.S).group(1)
    assert "surprise:" in legend and len(re.findall(r'class="sw b\d"', legend)) == 6 and "no store loss" in legend
    assert dom.count("<option") == 4 and "<polyline" in dom
    assert "memory learning" in dom and "memory frozen" in dom

    shot = tmp_path / "shot.png"
    result = browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    assert png_size(shot.read_bytes()) == (1200, 900) and shot.stat().st_size > 20_000


def test_sentencepiece_model_page(tmp_path):
    """A sentencepiece model whose byte-fallback pieces split characters still renders the whole text."""
    spm = pytest.importorskip("sentencepiece")
    chromium()
    import io

    from titans_mlx.tokenizer import SentencePieceTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([TEXT, "naïve café"] * 20), model_writer=buf,
                                   vocab_size=330, hard_vocab_limit=False, byte_fallback=True, minloglevel=2,
                                   character_coverage=0.99)
    (tmp_path / "t.model").write_bytes(buf.getvalue())
    tok = SentencePieceTokenizer(tmp_path / "t.model")
    model_dir = make_dir(tmp_path / "spm", dict(CONFIG, num_tokens=len(tok)), tokenizer=tok)
    doc = "And God said 日本語 naïve. " + TEXT
    out = tmp_path / "out"
    assert run_inspect("--model", model_dir, "--prompt", doc, "--out", out, "--format", "html,json") == 0
    rep = json.loads((out / "memory.json").read_text())
    assert "".join(rep["token_text"]) == tok.decode(rep["token_ids"])
    assert "" in rep["token_text"]  # a character split over byte pieces
    result = browse(out / "memory.html", tmp_path, "--dump-dom")
    assert 'id="rendered"' in result.stdout and page_errors(result.stdout) == ""
    assert "日本語 naïve." in re.sub(r"<[^>]+>", "", rendered_text(result.stdout))


def test_long_document_page_stays_small(tmp_path):
    chromium()
    # one memory layer with chunks of a whole window (32 + 2): a 20K-token read in a few seconds
    model_dir = make_dir(tmp_path / "m", dict(CONFIG, segment_len=32, neural_memory_segment_len=None,
                                              neural_memory_layers=[2]))
    out = tmp_path / "out"
    doc = (TEXT * 112)[:20_000]
    (tmp_path / "long.txt").write_text(doc)
    assert run_inspect("--model", model_dir, "--prompt-file", tmp_path / "long.txt", "--out", out,
                       "--format", "html") == 0
    result = browse(out / "memory.html", tmp_path, "--dump-dom")
    assert 'id="rendered"' in result.stdout and page_errors(result.stdout) == ""
    text = rendered_text(result.stdout)
    spans = text.count("<span")
    m = re.search(r'<div id="text"[^>]*data-spans="(\d+)"[^>]*data-tokens="(\d+)"', result.stdout)
    assert m and int(m.group(1)) == spans and int(m.group(2)) == PAGE_TOKENS
    assert spans < 20_000 / 5 and spans < PAGE_TOKENS  # one page, colour runs merged
    assert "page 1 of 5" in result.stdout


def test_documents_shorter_than_a_chunk(model_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    chromium()
    for doc in ("H", "Hi there"):  # no chunk written; one chunk of six tokens, two tokens left in the buffer
        out = tmp_path / f"out{len(doc)}"
        assert run_inspect("--model", model_dirs["plain"], "--prompt", doc, "--out", out) == 0
        rep = json.loads((out / "memory.json").read_text())
        known = [v is not None for v in rep["layers"][0]["surprise"][0]]
        assert known == ([False] if doc == "H" else [True] * 6 + [False] * 2)
        assert png_size((out / "memory.png").read_bytes())[0] > 500
        result = browse(out / "memory.html", tmp_path, "--dump-dom")
        assert 'id="rendered"' in result.stdout and page_errors(result.stdout) == ""
        assert re.sub(r"<[^>]+>", "", rendered_text(result.stdout)) == doc


def test_diverged_memory_still_renders(tmp_path):
    """A memory whose inner descent overflows gives nulls (valid JSON), a diverged_at token and a warning on the
    page, not a crash."""
    chromium()
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(CONFIG))
    model.layers[0].mem.to_values.weight = model.layers[0].mem.to_values.weight * 1e25  # (M(k) - v)^2 overflows
    mx.eval(model.parameters())
    save_model(tmp_path / "m", model, dict(CONFIG, model_type="titans_mac"), ByteTokenizer())
    out = tmp_path / "out"
    assert run_inspect("--model", tmp_path / "m", "--prompt", TEXT, "--out", out, "--format", "html,json") == 0

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON")

    rep = json.loads((out / "memory.json").read_text(), parse_constant=no_constants)
    assert rep["layers"][0]["diverged_at_token"] == 0
    assert all(v is None for v in rep["layers"][0]["surprise"][0])
    result = browse(out / "memory.html", tmp_path, "--dump-dom")
    assert 'id="rendered"' in result.stdout and page_errors(result.stdout) == ""
    assert re.search(r'<div id="warning">layer 1 · head 1: the memory\'s numbers are not finite from token 0 on',
                     result.stdout)


# ---- bad inputs ------------------------------------------------------------------------------------------------------


def bad(capsys, tmp_path, *argv, code=1):
    out = tmp_path / "bad-out"
    assert run_inspect(*argv, "--out", out) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    assert not out.exists() or not list(out.iterdir())
    return err


def test_bad_inputs(model_dirs, tmp_path, capsys):
    m = ("--model", model_dirs["plain"])
    assert "does not exist" in bad(capsys, tmp_path, *m, "--prompt-file", tmp_path / "missing.txt")
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    assert "is binary" in bad(capsys, tmp_path, *m, "--prompt-file", tmp_path / "bin.dat")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert "not UTF-8" in bad(capsys, tmp_path, *m, "--prompt-file", tmp_path / "latin1.txt")
    assert "empty" in bad(capsys, tmp_path, *m, "--prompt", "")
    no_memory = make_dir(tmp_path / "nomem", dict(CONFIG, neural_memory_layers=[]))
    assert "no neural memory layers" in bad(capsys, tmp_path, "--model", no_memory, "--prompt", TEXT)
    assert "does not exist" in bad(capsys, tmp_path, "--model", tmp_path / "nope", "--prompt", TEXT)
    assert "memory layers are 1,2" in bad(capsys, tmp_path, *m, "--prompt", TEXT, "--layers", "3")
    assert "expected layer numbers" in bad(capsys, tmp_path, *m, "--prompt", TEXT, "--layers", "two")
    assert "--format" in bad(capsys, tmp_path, *m, "--prompt", TEXT, "--format", "html,pdf")
    assert "holds no number" in bad(capsys, tmp_path, *m, "--prompt", TEXT, "--needle", "The pass key is secret.")
    assert "[0, 1]" in bad(capsys, tmp_path, *m, "--prompt", TEXT, "--needle", "Key 12.", "--depth", "1.5")
    assert "--depth places a --needle" in bad(capsys, tmp_path, *m, "--prompt", TEXT, "--depth", "0.5")
    assert "one of the arguments" in bad(capsys, tmp_path, *m, code=2)
    (tmp_path / "file").write_text("x")
    assert run_inspect(*m, "--prompt", TEXT, "--out", tmp_path / "file") == 1
    assert capsys.readouterr().err.startswith("error: --out") and (tmp_path / "file").read_text() == "x"


def test_layers_selects_layers(model_dirs, tmp_path):
    out = tmp_path / "out"
    assert run_inspect("--model", model_dirs["plain"], "--prompt", TEXT, "--out", out, "--format", "json",
                       "--layers", "2") == 0
    assert [layer["layer"] for layer in json.loads((out / "memory.json").read_text())["layers"]] == [2]
