"""Preparation of a ``python -m titans_mlx.train`` run: every input checked, data read, model and optimizer built.

Nothing is written here, so bad input (``TrainError``) leaves no trace: the CLI prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from .train_data import Corpus, TrainError, Windows, read_corpus, valid_batch_size
from .train_state import has_state, read_log, read_state, restore_optimizer

# settings that fix which samples each step sees: a resumed run must use the same ones to continue exactly
RUN_KEYS = ("seed", "batch_size", "seq_len", "grad_accumulation_steps")


@dataclass
class Run:
    """Everything a training run needs, prepared (and checked) before anything is written."""

    args: argparse.Namespace
    model: nn.Module
    config: dict
    tokenizer: object
    optimizer: optim.Optimizer
    corpus: Corpus
    start_step: int
    log: List[dict]
    world: object


def _check_args(args, world_size: int) -> None:
    positive = ("iters", "batch_size", "seq_len", "grad_accumulation_steps", "steps_per_eval", "steps_per_report")
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "save_every", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise TrainError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if args.val_batches < -1:
        raise TrainError(f"--val-batches must be -1 (all), 0 (none) or more, got {args.val_batches}")
    if args.warmup >= args.iters and args.lr_schedule == "cosine":
        raise TrainError(f"--warmup {args.warmup} leaves no steps of cosine decay within --iters {args.iters}")
    if args.batch_size % world_size:
        raise TrainError(f"--batch-size {args.batch_size} does not split across {world_size} processes")
    if args.resume and args.force:
        raise TrainError("--resume continues the run in --out and --force replaces it: give one of them")
    if not (0 <= args.prompt_loss_weight < float("inf")):
        raise TrainError(f"--prompt-loss-weight must be >= 0, got {args.prompt_loss_weight}")
    if not (0 < args.completion_loss_weight < float("inf")):
        raise TrainError(f"--completion-loss-weight must be > 0, got {args.completion_loss_weight}")
    if args.mask_prompt and args.prompt_loss_weight != 1.0:
        raise TrainError("--mask-prompt is --prompt-loss-weight 0: give one of them")


def _check_out(args) -> None:
    from .io import is_model_dir

    out = Path(args.out)
    exists = out.exists() or out.is_symlink()
    if args.resume:
        if not exists:
            raise TrainError(f"--resume: {out} does not exist")
        if not has_state(out):
            raise TrainError(f"--resume: {out} holds no saved training state")
    elif exists and not (out.is_dir() and not any(out.iterdir())):
        if not args.force:
            raise TrainError(f"--out {out} already exists (pass --resume to continue it or --force to replace it)")
        if not is_model_dir(out):
            raise TrainError(f"--out {out} exists and is not a model directory; refusing to replace it")


def _read_config(path: str) -> dict:
    from .mac import ModelArgs

    if path.startswith("preset:"):  # a named config of titans_mlx.presets
        from .presets import preset

        try:
            return preset(path[len("preset:"):])
        except ValueError as e:
            raise TrainError(f"--config {path}: {e}") from None
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"--config {path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise TrainError(f"--config {path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TrainError(f"--config {path}: expected a JSON object of MemoryAsContextTransformer arguments")
    from .io import language_model_types

    config.setdefault("model_type", "titans_mac")
    if config["model_type"] not in language_model_types():
        raise TrainError(f"--config {path}: model_type {config['model_type']!r} cannot be trained as a language "
                         f"model (expected one of {', '.join(language_model_types())})")
    # ModelArgs.from_dict drops unknown keys; a misspelt option would silently train another model
    from .io import MLX_LM_CONFIG_KEYS  # what a model dir's config.json adds for mlx-lm, so it can be fed back in

    unknown = sorted(set(config) - set(inspect.signature(ModelArgs).parameters) - set(MLX_LM_CONFIG_KEYS))
    if unknown:
        raise TrainError(f"--config {path}: {unknown[0]!r} is not a MemoryAsContextTransformer argument")
    return config


def _build(config: dict, source: str, seed: int):
    from .io import build_model, complete_config

    mx.random.seed(seed)  # every process draws the same initial weights
    try:
        model = build_model(config)
        full = complete_config(config)
    except (ValueError, TypeError, KeyError, NotImplementedError, AssertionError) as e:
        raise TrainError(f"{source}: cannot build a model ({' '.join(str(e).split()) or type(e).__name__})") from None
    mx.eval(model.parameters())
    return model, full


def _load(path, what: str):
    from .io import load, load_config

    if not Path(path).is_dir():
        raise TrainError(f"{what} {path}: no such model directory")
    try:
        model, tokenizer = load(path)
        config = load_config(path)
    except (ValueError, OSError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise TrainError(f"{what} {path}: cannot load the model ({reason})") from None
    if not hasattr(model, "loss"):
        raise TrainError(f"{what} {path}: a {config.get('model_type')} is not a language model this trainer can train")
    if "quantization" in config:  # quantized layers are frozen: only the float parameters would train
        raise TrainError(f"{what} {path}: the model is quantized; train the float model and quantize afterwards")
    return model, config, tokenizer


def _same_tokenizer(spec: str, tokenizer) -> bool:
    from .tokenizer import ByteTokenizer, SentencePieceTokenizer

    if spec == "bytes":
        return isinstance(tokenizer, ByteTokenizer)
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return False
    try:
        return Path(spec).read_bytes() == tokenizer.model_path.read_bytes()
    except OSError:
        return False


def _tokenizer(args, model_tokenizer):
    from .tokenizer import make_tokenizer

    if model_tokenizer is not None:
        if args.tokenizer is not None and not _same_tokenizer(args.tokenizer, model_tokenizer):
            raise TrainError(f"--tokenizer {args.tokenizer} does not match the tokenizer of --model {args.model} "
                             f"({model_tokenizer!r})")
        return model_tokenizer
    try:
        return make_tokenizer(args.tokenizer or "bytes")
    except ValueError as e:
        raise TrainError(str(e)) from None


def _schedule(args):
    lr = args.learning_rate
    if args.lr_schedule == "cosine":
        after = optim.cosine_decay(lr, args.iters - args.warmup, end=lr * 0.1)
    else:
        after = lambda step: mx.array(lr, dtype=mx.float32)
    if args.warmup == 0:
        return after
    # the optimizer evaluates the schedule before counting the step: update i (1-based) uses schedule(i - 1), so
    # warm-up climbs lr/W, 2lr/W, ..., lr over the first W updates (mlx-lm's linear_schedule(0, ...) wastes one)
    warm = optim.linear_schedule(lr / args.warmup, lr, max(args.warmup - 1, 1))
    return optim.join_schedules([warm, after], [args.warmup])


def loss_weights(args) -> tuple:
    """The loss weights of a prompt/completion record's prompt and completion targets (text's are 1)."""
    return (0.0 if args.mask_prompt else args.prompt_loss_weight), args.completion_loss_weight


def run_settings(args) -> dict:
    return {k: getattr(args, k) for k in RUN_KEYS}


def _check_resume(meta: dict, config: dict, args, corpus: Corpus, tokenizer) -> None:
    from .session import tokenizer_identity

    from .io import complete_config

    out = args.out
    saved = meta.get("config", {})
    try:  # a state saved before an option existed holds no value for it: its default is what that run used
        saved = complete_config(saved)
    except (ValueError, TypeError, KeyError):
        pass  # compared as saved: the difference is reported below
    for key in sorted(set(saved) | set(config)):
        if saved.get(key) != config.get(key):
            raise TrainError(f"--resume: the state in {out} is from another config ({key}: saved {saved.get(key)!r}, "
                             f"given {config.get(key)!r})")
    for key, value in run_settings(args).items():
        if meta.get("run", {}).get(key) != value:
            raise TrainError(f"--resume: --{key.replace('_', '-')} {value} differs from the saved run's "
                             f"{meta.get('run', {}).get(key)} (a resumed run continues with the same samples)")
    if meta.get("tokenizer") != tokenizer_identity(tokenizer):
        raise TrainError(f"--resume: the saved run used tokenizer {meta.get('tokenizer')}, "
                         f"not {tokenizer_identity(tokenizer)}")
    if meta.get("data_fingerprint") != corpus.fingerprint:
        raise TrainError(f"--resume: --data {args.data} is not the text the saved run was trained on")
    if meta.get("step", 0) > args.iters:
        raise TrainError(f"--resume: {out} is at step {meta['step']}, past --iters {args.iters}")


def prepare(args, world) -> Run:
    """Check every input, read the data, build or load the model and optimizer; writes nothing."""
    from .io import complete_config

    _check_args(args, world.size())
    _check_out(args)
    if args.config is not None:
        config = _read_config(args.config)
        model, config = _build(config, f"--config {args.config}", args.seed)
        model_tokenizer = None
    else:
        model, config, model_tokenizer = _load(args.model, "--model")
        config = complete_config(config)
    tokenizer = _tokenizer(args, model_tokenizer)
    num_tokens = config.get("num_tokens")
    if len(tokenizer) > num_tokens:
        raise TrainError(f"the tokenizer has {len(tokenizer)} tokens but the model only {num_tokens}")
    segment = config.get("segment_len")
    if args.seq_len < segment:
        raise TrainError(f"--seq-len {args.seq_len} is shorter than one segment of the model (segment_len {segment})")
    corpus = read_corpus(args.data, tokenizer, args.seq_len, want_valid=args.val_batches != 0)
    if corpus.valid is not None:
        valid_batch_size(Windows(corpus.valid, args.seq_len), args.batch_size, world.size())

    optimizer = optim.AdamW(learning_rate=_schedule(args), weight_decay=args.weight_decay)
    start_step, log = 0, []
    if args.resume:
        meta, arrays = read_state(args.out)
        _check_resume(meta, config, args, corpus, tokenizer)
        model, _, _ = _load(args.out, "--resume: checkpoint")
        restore_optimizer(optimizer, model, arrays, args.out)
        start_step, log = int(meta["step"]), read_log(args.out, int(meta["step"]))
    else:
        optimizer.init(model.trainable_parameters())
    return Run(args, model, config, tokenizer, optimizer, corpus, start_step, log, world)
