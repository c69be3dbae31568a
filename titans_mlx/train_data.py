"""Training data for ``python -m titans_mlx.train``: text in, token windows and their loss weights out.

DATA is a directory with ``train.jsonl`` and ``valid.jsonl`` (mlx-lm's formats, one record per line), a directory of
``.txt`` files, or one text file; for the last two the final ``VALID_FRACTION`` of the tokens is held out for
validation.

- Text (``{"text": ...}`` records, ``.txt`` files): documents are tokenized, joined with the tokenizer's EOS token (a
  newline when it has none) and packed into windows of ``seq_len + 1`` tokens that overlap by one (inputs and shifted
  targets), so a long document continues across consecutive windows. Every target has weight 1.
- Prompt/completion records (``{"prompt": ..., "completion": ...}``): one sample each, never packed (a retrieval
  sample must keep its fact and its question in one window), padded to ``seq_len + 1`` tokens. The completion's
  targets have weight ``--completion-loss-weight`` (default 1), the prompt's ``--prompt-loss-weight`` (mlx-lm's
  ``--mask-prompt``: 0), the padding 0.

Batches are a pure function of (seed, sample index): sample g of the run is ``perm(seed, epoch)[g % n]`` over the
n windows and records, with ``epoch = g // n``. A resumed run therefore needs only the step to continue exactly, and
a global batch split across processes holds the same samples as on one process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

VALID_FRACTION = 0.05


class TrainError(ValueError):
    """Bad input for the trainer: the CLI prints the message as one line and exits non-zero."""


@dataclass
class Split:
    """One split's data: the packed text stream (int32) and the prompt/completion records (ids, prompt length)."""

    tokens: np.ndarray
    records: List[Tuple[np.ndarray, int]] = field(default_factory=list)

    def __len__(self) -> int:  # tokens in all
        return len(self.tokens) + sum(len(ids) for ids, _ in self.records)

    def digest(self, h) -> None:
        h.update(self.tokens.tobytes())
        for ids, prompt in self.records:
            h.update(b"|record|%d|" % prompt + ids.tobytes())


@dataclass
class Corpus:
    """The training and validation splits, and a fingerprint of both."""

    train: Split
    valid: Optional[Split]
    description: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        self.train.digest(h)
        h.update(b"|valid|")
        if self.valid is not None:
            self.valid.digest(h)
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


def _read_jsonl(path: Path) -> Tuple[List[str], List[Tuple[int, str, str]]]:
    """The texts of ``{"text"}`` records and the (line, prompt, completion) of ``{"prompt", "completion"}`` ones."""
    texts, pairs = [], []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif (isinstance(record, dict) and isinstance(record.get("prompt"), str)
              and isinstance(record.get("completion"), str)):
            pairs.append((number, record["prompt"], record["completion"]))
        else:
            raise TrainError(f'{path} line {number}: expected an object with a "text" string, or "prompt" and '
                             '"completion" strings')
    if not any(texts) and not any(p or c for _, p, c in pairs):
        raise TrainError(f"{path} holds no text")
    return texts, pairs


def _records(pairs, tokenizer, seq_len: int, path: Path) -> List[Tuple[np.ndarray, int]]:
    records = []
    for number, prompt, completion in pairs:
        head, tail = _encode(tokenizer, prompt), _encode(tokenizer, completion)
        ids = np.concatenate([head, tail])
        if len(ids) > seq_len + 1:
            raise TrainError(f"{path} line {number}: the prompt and completion are {len(ids)} tokens, more than "
                             f"--seq-len {seq_len} + 1 (a record is one sample, never cut)")
        if len(tail) == 0 or len(ids) < 2:
            raise TrainError(f"{path} line {number}: an empty completion leaves nothing to learn")
        records.append((ids, len(head)))
    return records


def _read_split(path: Path, tokenizer, seq_len: int) -> Split:
    texts, pairs = _read_jsonl(path)
    split = Split(_tokenize(texts, tokenizer), _records(pairs, tokenizer, seq_len, path))
    if not split.records:
        _check_length(split.tokens, seq_len, path)
    return split


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
            train = _read_split(train_file, tokenizer, seq_len)
            valid = None
            if want_valid:
                if not valid_file.is_file():
                    raise TrainError(f"--data {path} has train.jsonl but no valid.jsonl (pass --val-batches 0 to "
                                     "train without validation)")
                valid = _read_split(valid_file, tokenizer, seq_len)
            records = f", {len(train.records):,} prompt/completion records" if train.records else ""
            return Corpus(train, valid, f"{train_file} ({len(train):,} tokens{records})")
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
    return Corpus(Split(train), Split(valid) if valid is not None else None, f"{source} ({len(tokens):,} tokens{held})")


def _check_length(tokens: np.ndarray, seq_len: int, source) -> None:
    if len(tokens) < seq_len + 1:
        raise TrainError(f"{source}: {len(tokens)} tokens, fewer than one window of --seq-len {seq_len} + 1")


class Windows:
    """A split's samples: the windows of seq_len + 1 tokens of its text stream (stride seq_len, the last partial
    window dropped), then its records padded to seq_len + 1; each with its seq_len target weights (float32)."""

    def __init__(self, split: Split, seq_len: int, prompt_weight: float = 1.0, completion_weight: float = 1.0):
        self.split = split
        self.seq_len = seq_len
        self.prompt_weight = prompt_weight
        self.completion_weight = completion_weight
        self.text_count = max(len(split.tokens) - 1, 0) // seq_len
        self.count = self.text_count + len(split.records)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        L = self.seq_len
        if i < self.text_count:
            return self.split.tokens[i * L : i * L + L + 1], np.ones(L, np.float32)
        ids, prompt = self.split.records[i - self.text_count]
        target = np.arange(1, L + 1)  # position of each target in the padded sample
        weights = np.where(target < prompt, self.prompt_weight,
                           np.where(target < len(ids), self.completion_weight, 0.0))
        return np.pad(ids, (0, L + 1 - len(ids))), weights.astype(np.float32)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _stack(samples) -> Tuple[np.ndarray, np.ndarray]:
    ids, weights = zip(*samples)
    return np.stack(ids).astype(np.int32), np.stack(weights)


def train_samples(windows: Windows, seed: int, first: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
    """Samples first..first+count-1 of a run: ids (count, seq_len + 1) int32 and their target weights
    (count, seq_len) float32, a pure function of the arguments."""
    rows = []
    for g in range(first, first + count):
        epoch, position = divmod(g, windows.count)
        rows.append(windows[int(_permutation(seed, epoch, windows.count)[position])])
    return _stack(rows)


def valid_batch_size(windows: Windows, batch_size: int, world: int) -> int:
    """The global validation batch: --batch-size, or fewer when the validation text is short (a multiple of world)."""
    size = min(batch_size, windows.count) // world * world
    if size == 0:
        raise TrainError(f"the validation data has {windows.count} samples of --seq-len {windows.seq_len}, fewer "
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
        ids, weights = _stack([dataset[i] for i in range(first, first + local)])
        yield mx.array(ids), mx.array(weights)
