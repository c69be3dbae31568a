"""Checkpoints of ``python -m titans_mlx.train``: OUT is a model directory plus the state a resumed run needs.

    OUT/config.json, model.safetensors, tokenizer.*     what titans_mlx.load and titans_mlx.generate read
    OUT/training_state/state.json                         step, the model config, run settings, data fingerprint
    OUT/training_state/optimizer.safetensors              tree_flatten(optimizer.state) (AdamW moments, step, lr)
    OUT/train_log.jsonl, OUT/loss_curve.png               reports so far (the PNG only when matplotlib is installed)

A checkpoint is staged in a temporary directory beside OUT and moved into place by renames, so OUT is always either
the previous checkpoint or the new one, never a mixture. The random state needs no file: the trainer reseeds MLX's
generator from (seed, step) before every step, and batches are a pure function of (seed, sample index).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .io import save_model
from .train_data import TrainError

STATE_DIR = "training_state"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss_curve.png"
STATE_FORMAT = "titans-mlx-training-state"
STATE_VERSION = 1


def write_checkpoint(out: Path, model, config: dict, tokenizer, optimizer, meta: dict, log: List[dict]) -> None:
    """Replace OUT with the model, the optimizer state, `meta` (state.json) and the log, all at once."""
    out = Path(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.checkpoint-", dir=parent))
    try:
        staged = save_model(tmp / "model", model, config, tokenizer)
        (staged / STATE_DIR).mkdir()
        optimizer_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(staged / STATE_DIR / OPTIMIZER_FILE), optimizer_state)
        record = {"format": STATE_FORMAT, "version": STATE_VERSION, **meta}
        (staged / STATE_DIR / STATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (staged / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log))
        plot_losses(log, staged / PLOT_FILE)
        # two renames (the old OUT aside, the new one in), as io.save_model: between them OUT is briefly absent,
        # never half-written; a crash there leaves the previous checkpoint in .OUT.checkpoint-*/old
        if out.exists():
            os.replace(out, tmp / "old")
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def has_state(out) -> bool:
    return (Path(out) / STATE_DIR / STATE_FILE).is_file()


def read_state(out) -> Tuple[dict, dict]:
    """(state.json, optimizer arrays) of OUT's checkpoint; TrainError when there is none or it is damaged."""
    out = Path(out)
    file = out / STATE_DIR / STATE_FILE
    if not file.is_file():
        raise TrainError(f"--resume: {out} holds no saved training state ({STATE_DIR}/{STATE_FILE})")
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"--resume: cannot read {file} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise TrainError(f"--resume: {file} is not a titans-mlx training state")
    if meta.get("version") != STATE_VERSION:
        raise TrainError(f"--resume: {file} has version {meta.get('version')!r}, this trainer reads {STATE_VERSION}")
    optimizer_file = out / STATE_DIR / OPTIMIZER_FILE
    try:
        arrays = mx.load(str(optimizer_file))
    except Exception as e:
        raise TrainError(f"--resume: cannot read {optimizer_file} ({' '.join(str(e).split())})") from None
    return meta, arrays


def restore_optimizer(optimizer, model, arrays: dict, source) -> None:
    """Load saved optimizer state into `optimizer` (initialised for `model` first, so the layout can be checked)."""
    optimizer.init(model.trainable_parameters())
    expected = dict(tree_flatten(optimizer.state))
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise TrainError(f"--resume: the optimizer state in {source} does not fit this model "
                         f"({'lacks' if missing else 'has an extra'} {name})")
    for key, value in expected.items():
        if tuple(arrays[key].shape) != tuple(value.shape):
            raise TrainError(f"--resume: optimizer state {key} in {source} has shape {tuple(arrays[key].shape)}, "
                             f"this model needs {tuple(value.shape)}")
    optimizer.state = tree_unflatten(list(arrays.items()))


def read_log(out, up_to_step: int) -> List[dict]:
    """The report records of OUT's log at or before `up_to_step` (later ones are redone by the resumed run)."""
    file = Path(out) / LOG_FILE
    if not file.is_file():
        return []
    records = []
    for line in file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def plot_losses(log: List[dict], path: Path) -> bool:
    """Write the loss curve to `path` when matplotlib is installed; True when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (valid, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or valid:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
