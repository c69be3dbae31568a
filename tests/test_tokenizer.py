"""titans_mlx.tokenizer: byte-level and sentencepiece tokenizers, streaming detokenizers, mlx-lm generation."""

import io
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
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id == 0
    assert isinstance(make_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="expected 'bytes'"):
        make_tokenizer(str(tmp_path / "missing.model"))


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
