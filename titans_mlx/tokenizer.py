"""Tokenizers for Titans models: byte-level (as titans-pytorch's train_mac.py) and sentencepiece.

Both give the small surface mlx-lm's generation code expects of a tokenizer (`encode`, `decode`,
`eos_token_id`, `bos_token`, `get_vocab`, `__len__`), so `mlx_lm.stream_generate(model, tokenizer, ...)`
accepts them as they are; `tokenizer.detokenizer` is a streaming detokenizer with mlx-lm's interface
(`reset`, `add_token`, `finalize`, `text`, `tokens`, `last_segment`), and `to_mlx_lm(tokenizer)`
wraps a tokenizer in mlx-lm's `TokenizerWrapper` with that detokenizer.

`save(dir)` writes files that transformers' AutoTokenizer (so mlx-lm's own `load`) reads as well, giving the same
ids: see `ByteTokenizer.save` and `SentencePieceTokenizer.save`.
"""

import codecs
import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

TOKENIZER_JSON = "tokenizer.json"
SPM_FILE = "tokenizer.model"
SPM_CONFIG = "tokenizer_config.json"
TOKENIZER_CONFIG = SPM_CONFIG  # both kinds write one, read by us and by transformers
# transformers 5's generic tokenizer class (mlx-lm needs transformers >= 5): it loads a `tokenizers` file, or
# builds one from a sentencepiece proto as it is (unigram or BPE, byte fallback, normalizer), unlike LlamaTokenizer
HF_TOKENIZER_CLASS = "TokenizersBackend"


def byte_tokenizer_json() -> dict:
    """The Hugging Face `tokenizers` file of ByteTokenizer: each byte of the UTF-8 text is one id, its value.

    A BPE model whose vocabulary is only the 256 byte-fallback pieces <0x00>..<0xFF>, without merges: no character
    is in the vocabulary, so byte fallback emits each character's UTF-8 bytes. No normalizer, pre-tokenizer or
    post-processor: the text is not changed first and no BOS/EOS is added. The decoder is sentencepiece's without
    the leading-space strip, so mlx-lm streams it with its SPMStreamingDetokenizer(trim_space=False): the bytes,
    decoded as UTF-8, nothing dropped (it does turn a literal U+2581 into a space). A ByteLevel (GPT-2) decoder
    would pick mlx-lm's BPE detokenizer instead, which drops a leading space of the output and turns byte 0 into
    U+0100.
    """
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {f"<0x{i:02X}>": i for i in range(256)},
            "merges": [],
        },
    }


def _is_byte_tokenizer_json(content) -> bool:
    want = byte_tokenizer_json()
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        return False
    parts = ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder")
    if any(content.get(k) != want[k] for k in parts):
        return False
    return all(content["model"].get(k) == v for k, v in want["model"].items())


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def _per_byte_replace(err: UnicodeDecodeError):
    # sentencepiece's rule: every byte of an invalid or cut-off sequence becomes one U+FFFD
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("titans_mlx.per_byte_replace", _per_byte_replace)


class _Detokenizer:
    """Streams text from token ids; `text` equals `tokenizer.decode(tokens)` once finalized.

    Each id maps to (surface bytes, kind): "text" pieces (whose leading space sentencepiece drops
    while nothing has been output yet), "byte" pieces and "control" pieces (no output, but they end
    a run of byte pieces). The bytes go through one incremental UTF-8 decoder.
    """

    def __init__(self, tokenizer):
        self._surfaces = tokenizer._surfaces()
        self._fallback = tokenizer._fallback_surface
        self._strip_first_space = tokenizer._strip_first_space
        self._errors = tokenizer._decode_errors
        self.reset()

    def reset(self):
        # fresh objects, not cleared ones: mlx-lm's TokenizerWrapper hands out shallow copies
        self.offset = 0
        self.text = ""
        self.tokens = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=self._errors)
        self._at_start = True

    def add_token(self, token: int):
        token = int(token)
        self.tokens.append(token)
        data, kind = self._surfaces[token] if 0 <= token < len(self._surfaces) else self._fallback
        if kind == "control":
            self.text += self._decoder.decode(b"", final=True)
            self._decoder.reset()
            return
        if kind == "text" and self._at_start and self._strip_first_space and data[:1] == b" ":
            data = data[1:]
        if data:
            self._at_start = False
        self.text += self._decoder.decode(data)

    def finalize(self):
        self.text += self._decoder.decode(b"", final=True)
        self._decoder.reset()

    @property
    def last_segment(self) -> str:
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


class _TokenizerBase:
    bos_token: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token: Optional[str] = None
    eos_token_id: Optional[int] = None
    chat_template = None

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def eos_token_ids(self) -> set:
        return set() if self.eos_token_id is None else {self.eos_token_id}

    @property
    def detokenizer(self) -> _Detokenizer:
        return _Detokenizer(self)

    def get_vocab(self) -> Dict[str, int]:
        return {t: i for i, t in enumerate(self.convert_ids_to_tokens(list(range(len(self)))))}

    def apply_chat_template(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__} has no chat template")

    def convert_tokens_to_ids(self, tokens):
        vocab = self.get_vocab()
        if isinstance(tokens, str):
            return vocab.get(tokens)
        return [vocab.get(t) for t in tokens]


def _ints(ids) -> List[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    return [int(i) for i in ids]


class ByteTokenizer(_TokenizerBase):
    """Byte-level tokenizer: text -> its UTF-8 bytes, 256 tokens, no special tokens.

    train_mac.py feeds raw enwik8 bytes, so this is its tokenization. To print samples it maps each
    token to `chr(max(32, token))` (Latin-1, control bytes as spaces); `decode_mode="train_mac"` does
    the same. The default, "utf-8", decodes the bytes as UTF-8 (invalid or cut-off sequences become
    U+FFFD): the same text for printable ASCII, and readable text for the rest.

    Args:
        eos_token_id: a byte that ends generation, or None (the default, as train_mac.py).
        decode_mode: "utf-8" or "train_mac". Default: ``"utf-8"``.
    """

    DECODE_MODES = ("utf-8", "train_mac")

    def __init__(self, eos_token_id: Optional[int] = None, decode_mode: str = "utf-8"):
        if eos_token_id is not None and not (isinstance(eos_token_id, int) and 0 <= eos_token_id < 256):
            raise ValueError(f"eos_token_id must be a byte (0-255), got {eos_token_id!r}")
        if decode_mode not in self.DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {self.DECODE_MODES}, got {decode_mode!r}")
        self.eos_token_id = eos_token_id
        self.decode_mode = decode_mode
        if decode_mode == "utf-8":
            # an id outside the vocabulary decodes as a byte that is never valid UTF-8: U+FFFD
            self._fallback_surface = (b"\xff", "byte")
        else:
            self._fallback_surface = ("\ufffd".encode("utf-8"), "text")

    def __len__(self) -> int:
        return 256

    def __repr__(self) -> str:
        return f"ByteTokenizer(eos_token_id={self.eos_token_id}, decode_mode={self.decode_mode!r})"

    _strip_first_space = False
    _decode_errors = "replace"

    def _surfaces(self):
        if self.decode_mode == "utf-8":
            return [(bytes([i]), "byte") for i in range(256)]
        return [(chr(max(32, i)).encode("utf-8"), "text") for i in range(256)]

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = _ints(ids)
        if self.decode_mode == "train_mac":
            return "".join(chr(max(32, i)) if 0 <= i < 256 else "\ufffd" for i in ids)
        return bytes(i if 0 <= i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return f"<0x{ids:02X}>"
        return [f"<0x{i:02X}>" for i in ids]

    def save(self, path) -> None:
        """Write `tokenizer.json` (a `tokenizers` file, see `byte_tokenizer_json`) and `tokenizer_config.json`.

        transformers (so mlx-lm) reads both; our settings are extra keys it ignores. The EOS byte is not given to
        transformers as `eos_token`: a special token would also match its name ("<0x0A>") in the text; mlx-lm reads
        it from config.json's `eos_token_id`, which `save_model` writes.
        """
        config = {"type": "bytes", "tokenizer_class": HF_TOKENIZER_CLASS, "clean_up_tokenization_spaces": False}
        if self.eos_token_id is not None:
            config["eos_token_id"] = self.eos_token_id
        if self.decode_mode != "utf-8":
            config["decode_mode"] = self.decode_mode
        (Path(path) / TOKENIZER_JSON).write_text(json.dumps(byte_tokenizer_json(), indent=2) + "\n")
        (Path(path) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=4) + "\n")


class SentencePieceTokenizer(_TokenizerBase):
    """A sentencepiece model (`tokenizer.model`).

    Args:
        model: path of a sentencepiece `.model` file.
        add_bos_token: prepend the BOS id in `encode(..., add_special_tokens=True)`. Default: ``False``.
    """

    def __init__(self, model: Union[str, Path], add_bos_token: bool = False):
        import sentencepiece as spm

        self.model_path = Path(model)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model}: not a sentencepiece model ({' '.join(str(e).split())})") from None
        sp = self._sp
        self.add_bos_token = bool(add_bos_token)
        n = sp.get_piece_size()
        self.bos_token_id = sp.bos_id() if 0 <= sp.bos_id() < n else None
        self.eos_token_id = sp.eos_id() if 0 <= sp.eos_id() < n else None
        self.bos_token = None if self.bos_token_id is None else sp.id_to_piece(self.bos_token_id)
        self.eos_token = None if self.eos_token_id is None else sp.id_to_piece(self.eos_token_id)
        spec = _normalizer_spec(self.model_path)
        # sentencepiece drops the leading space of the first output piece under these flags
        self._strip_first_space = spec.get("add_dummy_prefix", True) or spec.get(
            "remove_extra_whitespaces", True
        )
        self._surface_list = None
        self._fallback_surface = (" \u2047 ".encode("utf-8"), "unk")
        if spec.get("treat_whitespace_as_suffix", False):
            raise ValueError(f"{model}: sentencepiece models with treat_whitespace_as_suffix are not supported")

    _decode_errors = "titans_mlx.per_byte_replace"

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_path)!r}, vocab_size={len(self)})"

    def _surfaces(self):
        # what each id contributes to the decoded byte stream, as sentencepiece decodes it
        if self._surface_list is None:
            sp, out = self._sp, []
            for i in range(len(self)):
                piece = sp.id_to_piece(i)
                if sp.is_byte(i):
                    out.append((bytes([int(piece[3:5], 16)]), "byte"))
                elif sp.is_control(i):
                    out.append((b"", "control"))
                elif sp.is_unknown(i):
                    out.append(self._fallback_surface)
                else:
                    out.append((piece.replace("\u2581", " ").encode("utf-8"), "text"))
            self._surface_list = out
        return self._surface_list

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        n, unk = len(self), self._sp.unk_id()
        return self._sp.decode([i if 0 <= i < n else unk for i in _ints(ids)])

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = self._sp.encode(text)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._sp.id_to_piece(ids)
        return [self._sp.id_to_piece(i) for i in ids]

    def save(self, path) -> None:
        """Copy `tokenizer.model`; write `tokenizer_config.json` (read by us and by transformers) and, for mlx-lm,
        `tokenizer.json`: the `tokenizers` file transformers builds from the model (we always read tokenizer.model).

        mlx-lm picks its streaming detokenizer from tokenizer.json's decoder. Without the file it falls back to
        one that re-decodes the text, which goes back and forth over runs of byte pieces and so repeats characters
        in the stream; with it, byte-fallback models get its sentencepiece detokenizer.
        """
        from transformers import TokenizersBackend

        path = Path(path)
        shutil.copyfile(self.model_path, path / SPM_FILE)
        sp = self._sp
        unk = sp.id_to_piece(sp.unk_id()) if 0 <= sp.unk_id() < len(self) else None
        config = {
            "type": "sentencepiece",
            "add_bos_token": self.add_bos_token,
            # transformers' settings, as ours: BOS only when add_bos_token, never an EOS; null where the model has none
            "add_eos_token": False,
            "tokenizer_class": HF_TOKENIZER_CLASS,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": unk,
            "clean_up_tokenization_spaces": False,
        }
        (path / SPM_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
        (path / TOKENIZER_JSON).unlink(missing_ok=True)  # transformers would read a stale one, not tokenizer.model
        TokenizersBackend.from_pretrained(str(path)).backend_tokenizer.save(str(path / TOKENIZER_JSON))


def _normalizer_spec(path: Path) -> dict:
    """The decode-relevant normalizer flags of a sentencepiece model, read from its proto."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(path.read_bytes())
        spec = m.normalizer_spec
        return {
            "add_dummy_prefix": spec.add_dummy_prefix,
            "remove_extra_whitespaces": spec.remove_extra_whitespaces,
            "treat_whitespace_as_suffix": m.trainer_spec.treat_whitespace_as_suffix,
        }
    except Exception:  # protobuf missing or unusual proto: sentencepiece's default
        return {}


Tokenizer = Union[ByteTokenizer, SentencePieceTokenizer]


def load_tokenizer(path) -> Tokenizer:
    """Load the tokenizer of a model directory (`tokenizer.model` or `tokenizer.json`).

    A `tokenizer.json` is the byte tokenizer's `tokenizers` file (settings in `tokenizer_config.json`) or, as
    written before that file, `{"type": "bytes", ...}` with the settings in it.

    Raises:
        ValueError: no tokenizer in the directory, or one this package does not know.
    """
    path = Path(path)
    if (path / SPM_FILE).exists():
        config = {}
        if (path / SPM_CONFIG).exists():
            config = _read_json(path / SPM_CONFIG)
            if not isinstance(config, dict):
                raise ValueError(f"{path / SPM_CONFIG}: expected a JSON object")
        return SentencePieceTokenizer(path / SPM_FILE, add_bos_token=config.get("add_bos_token", False))
    if (path / TOKENIZER_JSON).exists():
        file = path / TOKENIZER_JSON
        content = _read_json(file)
        if isinstance(content, dict) and content.get("type") == "bytes":
            config = content
        elif _is_byte_tokenizer_json(content):
            file = path / TOKENIZER_CONFIG
            config = _read_json(file) if file.exists() else {}
            if not isinstance(config, dict) or config.get("type", "bytes") != "bytes":
                raise ValueError(f"{file}: not the config of a byte tokenizer (expected \"type\": \"bytes\")")
        else:
            raise ValueError(f"{file}: not a titans-mlx tokenizer (expected the byte tokenizer's tokenizers file "
                             f"that save_model writes, or {{\"type\": \"bytes\"}})")
        try:
            return ByteTokenizer(config.get("eos_token_id"), config.get("decode_mode", "utf-8"))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
    raise ValueError(f"{path}: no tokenizer ({SPM_FILE} or {TOKENIZER_JSON})")


def make_tokenizer(spec: str) -> Tokenizer:
    """'bytes' or the path of a sentencepiece .model file, as given to `python -m convert --tokenizer`."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--tokenizer {spec}: expected 'bytes' or a sentencepiece .model file")
    return SentencePieceTokenizer(path)


def to_mlx_lm(tokenizer: Tokenizer):
    """Wrap in mlx-lm's TokenizerWrapper, keeping this package's streaming detokenizer."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(tokenizer, detokenizer_class=_Detokenizer)
