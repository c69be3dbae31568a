"""titans_mlx.tokenizer: byte-level and sentencepiece tokenizers, streaming detokenizers, mlx-lm generation."""

import io
import json
import random

import mlx.core as mx
import mlx.nn as nn
import pytest

from titans_mlx.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer, make_tokenizer, to_mlx_lm

TEXT = "Titans learn to memorize at test time. Ünïcödé — naïve café, 日本語, emoji 🎉!\n"


def stream(tokenizer, ids):
    detok = tokenizer.detokenizer
    segments = []
    for t in ids:
        detok.add_token(t)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert "".join(segments) == detok.text
    assert detok.tokens == list(ids)
    return detok.text


def test_bytes_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and len(tok) == 256 == tok.vocab_size
    assert tok.decode(ids) == TEXT == stream(tok, ids)
    assert tok.decode(mx.array(ids)) == TEXT
    assert tok.eos_token_id is None and tok.eos_token_ids == set() and tok.bos_token is None


def test_bytes_invalid_utf8_and_out_of_range():
    tok = ByteTokenizer()
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # cut-off sequence
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    assert tok.decode([104, 300, -1, 105]) == "h\ufffd\ufffdi"
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100), rng.randrange(-2, 300)])
               for _ in range(rng.randrange(12))]
        assert stream(tok, ids) == tok.decode(ids)


def test_byte_stream_holds_back_partial_characters():
    tok = ByteTokenizer()
    detok = tok.detokenizer
    segments = []
    for t in "é€".encode("utf-8"):
        detok.add_token(t)
        segments.append(detok.last_segment)
    assert segments == ["", "é", "", "", "€"]


def test_bytes_train_mac_decoding(tmp_path):
    # train_mac.py prints samples with chr(max(32, token)) per token
    tok = ByteTokenizer(decode_mode="train_mac")
    ids = list("a\tb é".encode("utf-8")) + [7, 255]
    assert tok.decode(ids) == "a b \u00c3\u00a9 \u00ff" == "".join(chr(max(32, t)) for t in ids)
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(-2, 300) for _ in range(rng.randrange(12))]
        assert stream(tok, ids) == tok.decode(ids)
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).decode_mode == "train_mac"
    with pytest.raises(ValueError, match="decode_mode"):
        ByteTokenizer(decode_mode="latin1")


def test_bytes_save_load(tmp_path):
    ByteTokenizer(eos_token_id=0).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id == 0
    assert isinstance(make_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="expected 'bytes'"):
        make_tokenizer(str(tmp_path / "missing.model"))


def test_bytes_old_file_still_loads(tmp_path):
    # directories written before tokenizer.json became a `tokenizers` file hold {"type": "bytes", ...}
    (tmp_path / "tokenizer.json").write_text('{"type": "bytes", "eos_token_id": 3, "decode_mode": "train_mac"}')
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id == 3 and tok.decode_mode == "train_mac"


def test_unknown_tokenizer_files_are_refused(tmp_path):
    ByteTokenizer().save(tmp_path)
    content = json.loads((tmp_path / "tokenizer.json").read_text())
    content["model"]["vocab"]["<0x41>"], content["model"]["vocab"]["<0x42>"] = 66, 65  # no longer id = byte
    (tmp_path / "tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a titans-mlx tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: invalid JSON"):
        load_tokenizer(tmp_path)
    ByteTokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"type": "bytes", "eos_token_id": 300}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token_id must be a byte"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not the config of a byte tokenizer"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module", params=[(True, True), (False, False)], ids=["byte_fallback", "plain"])
def spm_file(request, tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    byte_fallback, dummy_prefix = request.param
    lines = ["The quick brown fox jumps over the lazy dog.", "Hello world! Ünïcödé façade, naïve café.",
             "日本語のテキスト。", "  spaces\tand tabs  ", "numbers 12345 #$%&"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=330 if byte_fallback else 80,
        hard_vocab_limit=False, byte_fallback=byte_fallback, add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=dummy_prefix, character_coverage=0.99, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "t.model"
    path.write_bytes(buf.getvalue())
    return path


def test_sentencepiece_stream_matches_decode(spm_file):
    tok = SentencePieceTokenizer(spm_file)
    sp = tok._sp
    ids = tok.encode("Hello world! The lazy café 🎉")
    assert ids == sp.encode("Hello world! The lazy café 🎉")
    assert tok.decode(ids) == sp.decode(ids) == stream(tok, ids)
    rng = random.Random(0)
    for _ in range(2000):  # arbitrary sequences: control, unknown, byte pieces, out-of-range ids
        ids = [rng.randrange(-2, len(tok) + 3) for _ in range(rng.randrange(12))]
        assert stream(tok, ids) == tok.decode(ids)


def test_sentencepiece_save_load(spm_file, tmp_path):
    tok = SentencePieceTokenizer(spm_file, add_bos_token=True)
    assert tok.encode("fox")[0] == tok.bos_token_id
    assert tok.bos_token_id not in tok.encode("fox", add_special_tokens=False)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, SentencePieceTokenizer) and again.add_bos_token
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert isinstance(make_tokenizer(str(spm_file)), SentencePieceTokenizer)


def test_not_a_sentencepiece_model(tmp_path):
    pytest.importorskip("sentencepiece")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "bad.model")


class ChainModel(nn.Module):
    """Always predicts table[last token]: a fixed continuation to generate."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def make_cache(self):
        return []

    def __call__(self, tokens, cache=None):
        nxt = [self.table.get(t, 0) for t in tokens[0].tolist()]
        return (mx.arange(256)[None, None, :] == mx.array(nxt)[None, :, None]).astype(mx.float32) * 10.0


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "to_mlx_lm"])
def test_mlx_lm_stream_generate(wrap):
    generate = pytest.importorskip("mlx_lm.generate")
    target = "é€!".encode("utf-8")
    chain = [ord("x"), *target]
    model = ChainModel(dict(zip(chain, chain[1:])))
    tok = ByteTokenizer()
    responses = list(generate.stream_generate(model, to_mlx_lm(tok) if wrap else tok, "x", max_tokens=len(target)))
    assert "".join(r.text for r in responses) == "é€!"
    assert [r.token for r in responses] == list(target)
    if wrap:  # our streaming detokenizer never yields half a character
        assert all("\ufffd" not in r.text for r in responses)


# ---- our tokenizer files in mlx-lm: transformers' AutoTokenizer and mlx-lm's own streaming detokenizer ----------


def mlx_lm_tokenizer(tokenizer, path):
    utils = pytest.importorskip("mlx_lm.utils")
    path.mkdir(exist_ok=True)
    tokenizer.save(path)
    return utils.load_tokenizer(path)


def mlx_lm_stream(wrapper, ids):
    """What mlx-lm prints for ids: the detokenizer's segments as they come, then what finalize adds."""
    detok = wrapper.detokenizer
    detok.reset()
    segments = []
    for t in ids:
        detok.add_token(t)
        segments.append(detok.last_segment)
    detok.finalize()
    return "".join(segments) + detok.last_segment


def random_text(rng, n):
    """Unicode text from every UTF-8 length class (no surrogates, no U+2581; see below)."""
    ranges = [(0, 0x80), (0x80, 0x800), (0x800, 0x2580), (0x2582, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(n))


def test_bytes_in_mlx_lm(tmp_path):
    ours = ByteTokenizer()
    theirs = mlx_lm_tokenizer(ours, tmp_path)
    assert len(theirs) == 256 and theirs.bos_token is None and theirs.eos_token_ids == set()
    rng = random.Random(0)
    texts = ["".join(map(chr, range(256))), TEXT, "<0x0A></s><s><unk> <|endoftext|>", " leading space", ""]
    texts += [random_text(rng, rng.randrange(1, 40)) for _ in range(300)]
    for text in texts:
        ids = list(text.encode("utf-8"))  # the byte values, not our output
        assert theirs.encode(text) == ids == ours.encode(text)  # no BOS added
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert mlx_lm_stream(theirs, ids) == text == stream(ours, ids)
        assert theirs.decode(ids) == text
    for _ in range(1000):  # any bytes, invalid UTF-8 included
        ids = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100)]) for _ in range(rng.randrange(1, 12))]
        if b"\xe2\x96\x81" in bytes(ids):
            continue  # U+2581: mlx-lm's sentencepiece detokenizer prints it as a space
        assert mlx_lm_stream(theirs, ids) == bytes(ids).decode("utf-8", errors="replace") == stream(ours, ids)


def test_sentencepiece_in_mlx_lm(spm_file, tmp_path):
    rng = random.Random(1)
    alphabet = "The quick brown fox, café Ünï 日本語 🎉\t\n  "
    texts = [TEXT, "Hello world! The lazy café 🎉", " leading", "  two  spaces", "a\nb\n c", ""]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) for _ in range(300)]
    for add_bos in (False, True):
        ours = SentencePieceTokenizer(spm_file, add_bos_token=add_bos)
        theirs = mlx_lm_tokenizer(ours, tmp_path / str(add_bos))
        sp = ours._sp  # sentencepiece itself: what both must agree with
        bos = [sp.bos_id()] if add_bos else []
        assert theirs.bos_token_id == sp.bos_id() and theirs.eos_token_ids == {sp.eos_id()}
        for text in texts:
            assert theirs.encode(text) == bos + sp.encode(text) == ours.encode(text)
            ids = sp.encode(text)
            if sp.unk_id() in ids:
                continue  # sentencepiece decodes <unk> as " \u2047 ", transformers as its name
            assert mlx_lm_stream(theirs, ids) == sp.decode(ids) == stream(ours, ids)
