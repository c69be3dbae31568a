"""Training data for ``python -m titans_mlx.train``: text in, packed token windows out.

DATA is a directory with ``train.jsonl`` and ``valid.jsonl`` (one ``{"text": ...}`` per line, mlx-lm's format), a
directory of ``.txt`` files, or one text file; for the last two the final ``VALID_FRACTION`` of the tokens is held
out for validation. Documents are tokenized, joined with the tokenizer's EOS token (a newline when it has none) and
packed into windows of ``seq_len + 1`` tokens that overlap by one (inputs and shifted targets), so a long document
continues across consecutive windows.

Batches are a pure function of (seed, sample index): sample g of the run is window ``perm(seed, epoch)[g % n]`` with
``epoch = g // n``. A resumed run therefore needs only the step to continue exactly, and a global batch split across
processes holds the same samples as on one process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

VALID_FRACTION = 0.05


class TrainError(ValueError):
    """Bad input for the trainer: the CLI prints the message as one line and exits non-zero."""


@dataclass
class Corpus:
    """Token streams (int32) for training and validation, and a fingerprint of both."""

    train: np.ndarray
    valid: Optional[np.ndarray]
    description: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.train.tobytes())
        h.update(b"|valid|" + (self.valid.tobytes() if self.valid is not None else b""))
        return h.hexdigest()


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrainError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _read_jsonl(path: Path) -> List[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TrainError(f'{path} line {number}: expected an object with a "text" string')
        texts.append(record["text"])
    if not any(texts):
        raise TrainError(f"{path} holds no text")
    return texts


def _encode(tokenizer, text: str) -> np.ndarray:
    from .tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):  # the same ids without a Python int per byte
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _tokenize(texts: List[str], tokenizer) -> np.ndarray:
    eos = getattr(tokenizer, "eos_token_id", None)
    separator = np.asarray([eos] if eos is not None else tokenizer.encode("\n"), dtype=np.int32)
    parts: List[np.ndarray] = []
    for text in texts:
        if text:
            if parts:
                parts.append(separator)
            parts.append(_encode(tokenizer, text))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _hold_out(tokens: np.ndarray, seq_len: int, want_valid: bool, source) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if not want_valid:
        return tokens, None
    n_valid = max(int(len(tokens) * VALID_FRACTION), seq_len + 1)
    if len(tokens) - n_valid < seq_len + 1:
        raise TrainError(f"{source}: {len(tokens)} tokens are too few to hold out validation text and still train on "
                         f"windows of --seq-len {seq_len} (pass --val-batches 0 to train on all of it)")
    return tokens[: len(tokens) - n_valid], tokens[len(tokens) - n_valid :]


def read_corpus(path, tokenizer, seq_len: int, want_valid: bool = True) -> Corpus:
    """Read and tokenize DATA (see the module docstring).

    Raises:
        TrainError: a missing, empty or unreadable file or directory, non-UTF-8 text, a malformed ``.jsonl`` line,
            or too little text for one window of ``seq_len + 1`` tokens.
    """
    path = Path(path)
    if not path.exists():
        raise TrainError(f"--data {path}: no such file or directory")
    if path.is_dir():
        train_file, valid_file = path / "train.jsonl", path / "valid.jsonl"
        if train_file.is_file():
            train = _tokenize(_read_jsonl(train_file), tokenizer)
            valid = None
            if want_valid:
                if not valid_file.is_file():
                    raise TrainError(f"--data {path} has train.jsonl but no valid.jsonl (pass --val-batches 0 to "
                                     "train without validation)")
                valid = _tokenize(_read_jsonl(valid_file), tokenizer)
            corpus = Corpus(train, valid, f"{train_file} ({len(train):,} tokens)")
            _check_length(corpus.train, seq_len, train_file)
            if valid is not None:
                _check_length(valid, seq_len, valid_file)
            return corpus
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise TrainError(f"--data {path}: no train.jsonl and no .txt files")
        texts = [_read_text(f) for f in files]
        if not any(texts):
            raise TrainError(f"--data {path}: the .txt files are empty")
        source = f"{path} ({len(files)} .txt files)"
    else:
        texts = [_read_text(path)]
        if not texts[0]:
            raise TrainError(f"--data {path} is empty")
        source = str(path)
    tokens = _tokenize(texts, tokenizer)
    _check_length(tokens, seq_len, source)
    train, valid = _hold_out(tokens, seq_len, want_valid, source)
    held = f", last {len(valid):,} held out for validation" if valid is not None else ""
    return Corpus(train, valid, f"{source} ({len(tokens):,} tokens{held})")


def _check_length(tokens: np.ndarray, seq_len: int, source) -> None:
    if len(tokens) < seq_len + 1:
        raise TrainError(f"{source}: {len(tokens)} tokens, fewer than one window of --seq-len {seq_len} + 1")


class Windows:
    """The windows of seq_len + 1 tokens of a token stream (stride seq_len, the last partial window dropped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.count = (len(tokens) - 1) // seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_samples(windows: Windows, seed: int, first: int, count: int) -> np.ndarray:
    """Samples first..first+count-1 of a run, (count, seq_len + 1) int32: a pure function of its arguments."""
    rows = []
    for g in range(first, first + count):
        epoch, position = divmod(g, windows.count)
        rows.append(windows[int(_permutation(seed, epoch, windows.count)[position])])
    return np.stack(rows)


def valid_batch_size(windows: Windows, batch_size: int, world: int) -> int:
    """The global validation batch: --batch-size, or fewer when the validation text is short (a multiple of world)."""
    size = min(batch_size, windows.count) // world * world
    if size == 0:
        raise TrainError(f"the validation text has {windows.count} windows of --seq-len {windows.seq_len}, fewer "
                         f"than one per process ({world})")
    return size


def iterate_valid(dataset: Windows, batch_size: int, max_seq_length: int = 0, comm_group=None, **_) -> Iterator:
    """Validation batches in order, this rank's share of each; the signature of mlx-lm's iterate_batches."""
    import mlx.core as mx

    world = comm_group.size() if comm_group is not None else 1
    rank = comm_group.rank() if comm_group is not None else 0
    local = batch_size // world
    for start in range(0, dataset.count - batch_size + 1, batch_size):
        first = start + rank * local
        yield (mx.array(np.stack([dataset[i] for i in range(first, first + local)])),)
