"""Train a Titans model, mlx-lm style: ``python -m titans_mlx.train``.

    python -m titans_mlx.train --config mac.json --data corpus.txt --out run --iters 1000
    python -m titans_mlx.train --config mac.json --data corpus.txt --out run --iters 1000 --resume   # after Ctrl-C
    mlx.launch -n 2 -- /abs/path/to/python -m titans_mlx.train ...      # data parallel over mx.distributed

OUT is a model directory (``titans_mlx.load``, ``python -m titans_mlx.generate --model OUT``) that also holds the
optimizer state and step (train_state.py), rewritten atomically every ``--save-every`` steps, on Ctrl-C and at the
end. Data: train_data.py; input checks and the model, tokenizer and optimizer: train_setup.py.

The loop has mlx-lm's ``tuner.trainer.train`` shape (the step compiled over ``[model.state, optimizer.state,
mx.random.state]``, gradients accumulated as there, ``nn.average_gradients`` across processes, mlx-lm's ``evaluate``
for validation) but is our own, because that trainer has no gradient clipping, no resume (optimizer state, RNG,
data position), saves adapter weights only, has no NaN stop or Ctrl-C checkpoint, and counts micro-batches rather
than optimizer steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .generate import _Parser  # one-line argparse errors, exit 2
from .train_data import TrainError, Windows, iterate_valid, train_samples, valid_batch_size
from .train_setup import Run, loss_weights, prepare, run_settings
from .train_state import write_checkpoint


def setup_arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m titans_mlx.train", description="Train a Titans (MLX) model on text.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="JSON of the model's keyword arguments (the converter's format), or preset:NAME "
                     "(python -m titans_mlx.presets lists them): from scratch")
    src.add_argument("--model", help="Model directory to continue from (converted or trained)")
    p.add_argument("--data", required=True,
                   help="Directory with train.jsonl and valid.jsonl ({\"text\": ...} per line), a directory of .txt "
                   "files, or one text file (the last 5%% held out for validation)")
    p.add_argument("--out", required=True, help="Output model directory (also the checkpoint --resume reads)")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a sentencepiece .model file. Default: the --model's own, else bytes")
    p.add_argument("--iters", type=int, default=1000, help="Total optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="Global batch in sequences, split across processes (8)")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per sequence (default 512)")
    p.add_argument("--prompt-loss-weight", type=float, default=1.0,
                   help="Loss weight of the prompt's targets in prompt/completion records, the completion's being 1 "
                   "(default 1: the whole record)")
    p.add_argument("--mask-prompt", action="store_true", help="Train on completions only (--prompt-loss-weight 0)")
    p.add_argument("--completion-loss-weight", type=float, default=1.0,
                   help="Loss weight of the completion's targets in prompt/completion records, text being 1 (default "
                   "1); above 1 a short answer counts for more than the text around it")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Peak AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=0, help="Linear warm-up steps (default 0)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="After warm-up: cosine decay to 10%% of the peak at --iters, or constant (default cosine)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="Clip the global gradient norm to this (0: off; 1.0)")
    p.add_argument("--grad-accumulation-steps", type=int, default=1,
                   help="Micro-batches of --batch-size per optimizer step (default 1)")
    p.add_argument("--val-batches", type=int, default=25, help="Validation batches (-1: all; 0: no validation; 25)")
    p.add_argument("--steps-per-eval", type=int, default=200, help="Steps between validations (default 200)")
    p.add_argument("--steps-per-report", type=int, default=10, help="Steps between train-loss reports (default 10)")
    p.add_argument("--save-every", type=int, default=100, help="Steps between checkpoints (0: only at the end; 100)")
    p.add_argument("--seed", type=int, default=0, help="Seed of the initial weights and the data order (default 0)")
    p.add_argument("--resume", action="store_true", help="Continue the run saved in --out")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="Recompute each layer in the backward pass (less memory, more time)")
    p.add_argument("--force", action="store_true", help="Replace a model directory already at --out")
    return p


# ---- the training step ----------------------------------------------------------------------------------------------


def _loss(model, ids, weights):
    return model.loss(ids, weights)


def make_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, accumulation: int):
    """The compiled micro-step ``(ids, weights, grad_sum, apply) -> (loss, grad_sum, grad_norm)`` and its state.

    As mlx-lm's trainer: gradients of the micro-batches are summed; on the last (``apply``) they are averaged over
    processes and micro-batches, clipped, and applied. No ``.item()`` and no branch on array values inside.
    """
    loss_and_grad = nn.value_and_grad(model, _loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(ids, weights, grad_sum, apply: bool):
        loss, grad = loss_and_grad(model, ids, weights)
        if grad_sum is not None:
            grad = tree_map(lambda a, b: a + b, grad, grad_sum)
        if not apply:
            return loss, grad, None
        grad = nn.average_gradients(grad)
        if accumulation > 1:
            grad = tree_map(lambda g: g / accumulation, grad)
        if grad_clip > 0:
            grad, norm = optim.clip_grad_norm(grad, grad_clip)
        else:
            norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grad)))
        optimizer.update(model, grad)
        return loss, None, norm

    return step, state


def _step_seed(seed: int, step: int) -> int:
    # the random state is a pure function of (seed, step): a resumed run draws what an uninterrupted one would
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint32)[0])


# ---- the loop -------------------------------------------------------------------------------------------------------


def _validate(run: Run) -> float:
    from mlx_lm.tuner.trainer import evaluate

    windows = Windows(run.corpus.valid, run.args.seq_len, *loss_weights(run.args))
    size = valid_batch_size(windows, run.args.batch_size, run.world.size())
    available = windows.count // size
    batches = available if run.args.val_batches == -1 else min(run.args.val_batches, available)
    # mlx-lm's evaluate weighs each batch's mean by its token count: here the weight its targets carry
    loss = evaluate(run.model, windows, size, batches, loss=lambda m, ids, w: (m.loss(ids, w), w.sum()),
                    iterate_batches=iterate_valid)
    run.model.train()
    return loss


def fit(run: Run) -> int:
    """Train from run.start_step to --iters; returns the exit status (0, 1 on a NaN loss, 130 on Ctrl-C)."""
    from tqdm import tqdm

    from .generate import _ctrl_c
    from .session import tokenizer_identity

    args, model, optimizer, world = run.args, run.model, run.optimizer, run.world
    rank, size = world.rank(), world.size()
    main = rank == 0
    K, B, L = args.grad_accumulation_steps, args.batch_size, args.seq_len
    local = B // size
    windows = Windows(run.corpus.train, L, *loss_weights(args))
    model.train()
    model.checkpoint_layers = args.grad_checkpoint
    step_fn, state = make_step(model, optimizer, args.grad_clip, K)
    out = Path(args.out)

    def say(line: str) -> None:
        if main:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def save(step: int) -> None:
        if not main:
            return
        meta = {"step": step, "iters": args.iters, "config": run.config, "run": run_settings(args),
                "tokenizer": tokenizer_identity(run.tokenizer), "data": str(args.data),
                "data_fingerprint": run.corpus.fingerprint, "samples_seen": step * K * B,
                "random": {"seed_of_next_step": _step_seed(args.seed, step + 1)}}
        try:
            write_checkpoint(out, model, run.config, run.tokenizer, optimizer, meta, run.log)
        except OSError as e:
            raise TrainError(f"cannot write the checkpoint to {out}: {e.strerror or e}") from None

    def validate(step: int) -> None:
        if run.corpus.valid is None:
            return
        tic = time.perf_counter()
        loss = _validate(run)
        took = time.perf_counter() - tic
        run.log.append({"step": step, "val_loss": loss, "val_time": took})
        say(f"Iter {step}: Val loss {loss:.3f}, Val took {took:.3f}s")

    if main:
        n = sum(v.size for _, v in tree_flatten(model.parameters()))
        print(f"[INFO] {n:,} parameters; data {run.corpus.description}; {size} process(es), global batch {B} x "
              f"{K} micro-batch(es) of {L} tokens", flush=True)
        if run.start_step:
            print(f"[INFO] Resuming {out} at step {run.start_step}", flush=True)
    if run.start_step == args.iters:
        if main:
            print(f"[INFO] {out} is already at step {args.iters}: nothing to train", flush=True)
        return 0
    if run.start_step == 0:
        validate(0)
    saved_step = run.start_step if args.resume else None
    losses, reported_steps, train_time = 0.0, 0, 0.0
    bar = tqdm(total=args.iters, initial=run.start_step, unit="step", file=sys.stderr, disable=None if main else True,
               dynamic_ncols=True, leave=False)
    with _ctrl_c() as pressed:
        for step in range(run.start_step + 1, args.iters + 1):
            tic = time.perf_counter()
            mx.random.seed(_step_seed(args.seed, step))
            grad_sum, loss_sum = None, mx.array(0.0)
            for micro in range(K):
                first = ((step - 1) * K + micro) * B + rank * local
                ids, weights = train_samples(windows, args.seed, first, local)
                loss, grad_sum, norm = step_fn(mx.array(ids), mx.array(weights), grad_sum, micro == K - 1)
                loss_sum = loss_sum + loss
                mx.eval(state, loss_sum, grad_sum, norm)  # bounds memory: one micro-batch's graph at a time
            stats = mx.stack([loss_sum / K, norm.astype(mx.float32), mx.array(float(bool(pressed)))])
            if size > 1:  # every process sees the same loss and stop flag, so all stop at the same step
                stats = mx.distributed.all_sum(stats, stream=mx.cpu) / size
            loss_value, norm_value, stop = (float(v) for v in stats.tolist())
            train_time += time.perf_counter() - tic
            bar.update(1)
            if not (np.isfinite(loss_value) and np.isfinite(norm_value)):
                bar.close()
                what = "loss" if not np.isfinite(loss_value) else "gradient norm"
                kept = f"{out} keeps the checkpoint of step {saved_step}" if saved_step is not None else "nothing saved"
                if main:
                    print(f"error: the {what} is {loss_value if what == 'loss' else norm_value} at step {step}; "
                          f"stopped ({kept})", file=sys.stderr)
                return 1
            losses += loss_value
            reported_steps += 1
            if step % args.steps_per_report == 0 or step == args.iters or stop:
                took = max(train_time, 1e-9)
                record = {"step": step, "train_loss": losses / reported_steps,
                          "learning_rate": optimizer.learning_rate.item(), "grad_norm": norm_value,
                          "iterations_per_second": reported_steps / took,
                          "tokens_per_second": reported_steps * K * B * L / took, "trained_tokens": step * K * B * L,
                          "peak_memory_gb": mx.get_peak_memory() / 1e9}
                run.log.append(record)
                say(f"Iter {step}: Train loss {record['train_loss']:.3f}, Learning Rate {record['learning_rate']:.3e}, "
                    f"It/sec {record['iterations_per_second']:.3f}, Tokens/sec {record['tokens_per_second']:.1f}, "
                    f"Trained Tokens {record['trained_tokens']}, Peak mem {record['peak_memory_gb']:.3f} GB")
                losses, reported_steps, train_time = 0.0, 0, 0.0
            if run.corpus.valid is not None and (step % args.steps_per_eval == 0 or step == args.iters):
                validate(step)
            if stop or step == args.iters or (args.save_every and step % args.save_every == 0):
                save(step)
                saved_step = step
                if not stop and step != args.iters:
                    say(f"Iter {step}: Saved checkpoint to {out}")
            if stop:
                bar.close()
                if main:
                    print(f"[interrupted] checkpoint of step {step} saved to {out}; continue with --resume",
                          file=sys.stderr)
                return 130
    bar.close()
    say(f"Saved final weights to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The CLI; returns the exit status (2 bad flags, 1 bad input or NaN loss, 130 Ctrl-C)."""
    args = setup_arg_parser().parse_args(argv)
    world = mx.distributed.init()
    try:
        return fit(prepare(args, world))
    except TrainError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from .blas import run_cli

    sys.exit(run_cli("titans_mlx.train", main))
