"""Train the bundled demo model with the real titans-pytorch (0.5.5) on the CPU.

A small byte-level MemoryAsContextTransformer on the King James Bible (demo/prepare_corpus.py). To teach the model to
use its neural memory, most training windows carry passages written twice, the second time further along than
attention can reach (sliding windows of segment + long-term tokens over three layers: about 110 positions), so the
only way to predict a second copy better is to have stored the first one in the neural memory. By default every such
passage carries a random number: digits are what the text cannot predict, so they are where storing pays most, and
where a memory that writes selectively has something to select. Why the memory is set up as it is: the comments in
CONFIG and demo/README.md.

    /work/venv-tp/bin/python demo/train_demo.py --out demo/runs/kjv --steps 1500 --minutes 62 --threads 2

Writes <out>/config.json (MemoryAsContextTransformer kwargs), <out>/model.pt (state dict; rewritten at every
validation so a cut-off run still leaves a usable model), <out>/log.txt, <out>/val.json.
"""

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch

from titans_pytorch import MemoryAsContextTransformer, NeuralMemory
from titans_pytorch.memory_models import MemoryMLP

CONFIG = dict(
    num_tokens=256,
    dim=192,
    depth=3,
    segment_len=32,
    num_persist_mem_tokens=4,
    num_longterm_mem_tokens=4,
    neural_memory_layers=[2, 3],
    # test-time training proper: every chunk's gradient is taken at the weights the previous chunks left (the delta
    # rule), so what all keys share is learned once and the rest is stored per context; with every gradient taken at
    # the initial weights (the default) the memory only sums its writes, and keys as alike as this model's (mean
    # cosine 0.6-0.7 in a run with that store) read back the average of everything
    neural_memory_batch_size=36,
    # a linear associative memory (one 192x192 matrix, the delta rule's loss): one wide head matches a repeated
    # context far more sharply than four narrow ones or the default two-layer MLP (a lone NeuralMemory at
    # initialisation, fed random token vectors, reads a passage stored 1,000 tokens earlier back with cosine 0.28 to
    # its values, against ~0 for those)
    neural_memory_model={"class": "MemoryMLP", "dim": 192, "depth": 1},
    # forgetting starts near zero (sigmoid(-5) = 0.7% per 36-token chunk instead of 50%), so a passage stored now is
    # still in the memory thousands of tokens later; each key is trained against the next token's value, so a
    # stored passage answers "what came after this?"; the retrieved vector is RMS-normalised, since a memory that
    # accumulates thousands of writes would otherwise swamp the residual stream.
    # Writes start small (inner step 0.3 * sigmoid(-4) = 0.005 per token) and the learned per-token step can open up
    # to 0.3: 192 dimensions cannot hold every one of thousands of tokens, but they can hold the few worth writing.
    # (demo/probe_selective_writes.py: this model's memory, writing a number at step 0.5 and everything else at 0.005,
    # still knows which number it was 4,000 bytes later; writing every token at 0.05 it keeps far less of it.)
    # A maximum step of 1.0 diverges at initialisation, where a whole chunk of alike keys is written at once.
    neural_memory_kwargs=dict(dim_head=192, heads=1, init_decay_bias=-5.0, qk_rmsnorm=True, post_rmsnorm=True,
                              mem_model_norm_add_residual=False, store_with_lookahead_value=True,
                              default_step_transform_max_lr=0.3, init_adaptive_step_bias=-4.0),
    dim_head=48,
    heads=4,
    ff_mult=4,
    num_residual_streams=1,
    sliding_window_attn=True,
)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


def load_bytes(path):
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def passage(data, rng, p_digits):
    """32-128 bytes of text; with probability p_digits a 3-8 digit random number replaces part of it."""
    m = rng.randrange(32, 129)
    src = rng.randrange(0, len(data) - m)
    p = data[src : src + m].copy()
    if rng.random() < p_digits:
        k = rng.randrange(3, 9)
        at = rng.randrange(1, m - k - 1)
        p[at - 1], p[at + k] = ord(" "), ord(" ")
        p[at : at + k] = DIGITS[[rng.randrange(10) for _ in range(k)]]
    return p


def make_window(data, n, rng, p_copy, min_gap, p_digits, copies=1):
    """A random window of n bytes; with probability p_copy, `copies` passages each written twice, min_gap+ apart.

    Returns the window and the last pair's offsets (first, second, length), or None."""
    start = rng.randrange(0, len(data) - n)
    w = data[start : start + n].copy()
    if rng.random() >= p_copy:
        return w, None
    for _ in range(copies):
        p = passage(data, rng, p_digits)
        m = len(p)
        a = rng.randrange(0, n // 3)
        b = rng.randrange(a + m + min_gap, n - m + 1)
        w[a : a + m] = p
        w[b : b + m] = p
    return w, (a, b, m)


def build(config):
    """MemoryAsContextTransformer from the JSON form of its kwargs (the form python -m convert reads)."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "model_type"}
    if isinstance(kw.get("neural_memory_model"), dict):
        spec = dict(kw["neural_memory_model"])
        assert spec.pop("class") == "MemoryMLP"
        kw["neural_memory_model"] = MemoryMLP(**spec)
    return MemoryAsContextTransformer(**kw)


def load_run(run_dir):
    """A training run's model (its config.json and model.pt) in eval mode, and its config."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    model = build(config)
    model.load_state_dict(torch.load(os.path.join(run_dir, "model.pt")), assign=True)
    return model.eval(), config


def tie_queries_to_keys(model):
    """Each memory reads with its store's projection and norms: a context seen again then reads back what followed it
    the first time. Left independent (even starting equal), training drifts them apart (cosine 0.5-0.6 between a
    repeated token's query and its first key after 1,100 steps). The checkpoint still holds both (equal) tensors, so
    it loads anywhere a MemoryAsContextTransformer does."""
    for mod in model.modules():
        if isinstance(mod, NeuralMemory):
            mod.to_queries.weight = mod.to_keys.weight
            mod.q_norm.gamma = mod.k_norm.gamma
            mod.retrieve_norm.weight = mod.store_norm.weight


def silence_positional_embedding(model):
    """Zero and freeze the absolute (axial) positional embedding; attention keeps its rotary positions. Otherwise
    the same text starts with different keys at different places (the embedding's norm is 36-73 at initialisation
    against the tokens' 14), and its outer axis, the segment index, is a learned function that text longer than the
    training windows would extrapolate."""
    for mlp in model.axial_pos_emb.mlps:
        for prm in mlp[-1].parameters():
            prm.data.zero_()
            prm.requires_grad_(False)


@torch.no_grad()
def evaluate(model, windows):
    model.eval()
    losses = [model(torch.from_numpy(w[None].astype(np.int64)), return_loss=True).item() for w in windows]
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def recall(model, probes):
    """Loss (nats/byte) on second copies, and on their digits: after the first copy vs after other text in its place."""
    model.eval()
    out, digits = [], []
    for rep, ctl, (b, m) in probes:
        row, drow = [], []
        is_digit = (rep[b : b + m] >= ord("0")) & (rep[b : b + m] <= ord("9"))
        for w in (rep, ctl):
            logits = model(torch.from_numpy(w[None, :-1].astype(np.int64)))[0]
            nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(w[1:].astype(np.int64)), reduction="none")
            row.append(nll[b - 1 : b + m - 1].mean().item())
            drow.append(nll[b - 1 : b + m - 1].numpy()[is_digit])
        out.append(row)
        digits.append(drow)
    model.train()
    rep_d, ctl_d = (float(np.concatenate(x).mean()) for x in zip(*digits))
    return (*np.mean(out, axis=0), rep_d, ctl_d)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "runs", "kjv"))
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (the cosine schedule's length)")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this long (a usable checkpoint stays)")
    p.add_argument("--seq-len", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--p-copy", type=float, default=0.9)
    p.add_argument("--p-digits", type=float, default=1.0)
    p.add_argument("--copies", type=int, default=3, help="passages written twice per window")
    p.add_argument("--min-gap", type=int, default=128)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, val = load_bytes(os.path.join(args.data, "train.txt")), load_bytes(os.path.join(args.data, "val.txt"))
    vrng = random.Random(1234)
    val_windows = [make_window(val, args.seq_len + 1, vrng, 0.0, 0, 0.0)[0] for _ in range(args.val_windows)]
    probes = []
    for _ in range(args.val_windows):
        rep, (a, b, m) = make_window(val, args.seq_len + 1, vrng, 1.0, args.min_gap, args.p_digits)
        ctl = rep.copy()
        src = vrng.randrange(0, len(val) - m)
        ctl[a : a + m] = val[src : src + m]  # the first copy replaced by unrelated text
        probes.append((rep, ctl, (b, m)))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dict(CONFIG, model_type="titans_mac"), f, indent=4, sort_keys=True)
    model = build(CONFIG)
    # heads > 1: memory_model_parameters.* are stride-0 views (einops.repeat) on the CPU, which no optimizer can
    # write to; materialise them (what .cuda() does in upstream's train_mac.py)
    for prm in model.parameters():
        prm.data = prm.data.clone()
    tie_queries_to_keys(model)
    silence_positional_embedding(model)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [prm for prm in model.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    log = open(os.path.join(args.out, "log.txt"), "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    def validate(step, t0, final=False):
        vl = evaluate(model, val_windows)
        rep, ctl, rep_d, ctl_d = recall(model, probes)
        say(f"{'final ' if final else ''}step {step}  val_loss {vl:.4f} nats/byte = {vl / math.log(2):.4f} bits/byte  "
            f"second copy {rep / math.log(2):.3f} bits/byte after the first vs {ctl / math.log(2):.3f} without, "
            f"its digits {rep_d / math.log(2):.3f} vs {ctl_d / math.log(2):.3f}")
        tmp = os.path.join(args.out, "model.pt.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, os.path.join(args.out, "model.pt"))
        with open(os.path.join(args.out, "val.json"), "w") as f:
            json.dump({"step": step, "val_loss": vl, "val_bpb": vl / math.log(2), "copy_bpb_repeat": rep / math.log(2),
                       "copy_bpb_control": ctl / math.log(2), "copy_digits_bits_repeat": rep_d / math.log(2),
                       "copy_digits_bits_control": ctl_d / math.log(2), "elapsed_s": time.time() - t0,
                       "params": n_params},
                      f, indent=2)

    say(f"args {vars(args)}  params {n_params}  config {CONFIG}")
    t0 = time.time()
    deadline = t0 + 60 * args.minutes if args.minutes else float("inf")
    step = 0
    while step < args.steps and time.time() < deadline:
        # linear warmup, then cosine decay to 10% over --steps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = np.stack([make_window(train, args.seq_len + 1, rng, args.p_copy, args.min_gap, args.p_digits,
                                      args.copies)[0]
                          for _ in range(args.batch_size)])
        loss = model(torch.from_numpy(batch.astype(np.int64)), return_loss=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        step += 1
        if step % 10 == 0:
            say(f"step {step}  loss {loss.item():.4f}  lr {lr:.2e}  elapsed {time.time() - t0:.0f}s")
        if step % args.val_every == 0 and step < args.steps:
            validate(step, t0)
    validate(step, t0, final=True)


if __name__ == "__main__":
    main()
