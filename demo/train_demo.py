"""Train the bundled demo model with the real titans-pytorch (0.5.5) on the CPU.

A small byte-level MemoryAsContextTransformer on the King James Bible (demo/prepare_corpus.py). To teach the model to
use its neural memory, half of the training windows get a passage of text copied to a point further along the window
than attention can reach (sliding windows of segment+long-term tokens, over a few layers: < 300 tokens), so the only
way to predict the copy better is to have stored the first occurrence in the neural memory.

    /work/venv-tp/bin/python demo/train_demo.py --out demo/runs/kjv --steps 520 --minutes 70

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

from titans_pytorch import MemoryAsContextTransformer

CONFIG = dict(
    num_tokens=256,
    dim=192,
    depth=3,
    segment_len=32,
    num_persist_mem_tokens=4,
    num_longterm_mem_tokens=4,
    neural_memory_layers=[2, 3],
    # forgetting starts near zero (sigmoid(-5) = 0.7% per 36-token chunk instead of 50%), so a passage stored now
    # is still in the memory thousands of tokens later and the copy task below can teach the model to use it
    neural_memory_kwargs=dict(dim_head=48, heads=4, init_decay_bias=-5.0),
    dim_head=48,
    heads=4,
    ff_mult=4,
    num_residual_streams=1,
    sliding_window_attn=True,
)


def load_bytes(path):
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def make_window(data, n, rng, p_copy, min_gap):
    """A random window of n bytes; with probability p_copy a passage is copied min_gap+ bytes further on."""
    start = rng.randrange(0, len(data) - n)
    w = data[start : start + n].copy()
    if rng.random() < p_copy:
        m = rng.randrange(64, 161)
        src = rng.randrange(0, len(data) - m)
        passage = data[src : src + m]
        a = rng.randrange(0, min(n // 8, n - 2 * m - min_gap))
        b = rng.randrange(a + m + min_gap, n - m + 1)
        w[a : a + m] = passage
        w[b : b + m] = passage
    return w


@torch.no_grad()
def evaluate(model, windows):
    model.eval()
    losses = [model(torch.from_numpy(w[None].astype(np.int64)), return_loss=True).item() for w in windows]
    model.train()
    return float(np.mean(losses))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "runs", "kjv"))
    p.add_argument("--steps", type=int, default=520, help="optimizer steps (the cosine schedule's length)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (schedule of --steps)")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this long (a usable checkpoint stays)")
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--p-copy", type=float, default=0.75)
    p.add_argument("--min-gap", type=int, default=320)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None, help="start from this state dict (model.pt of an earlier run)")
    p.add_argument("--fix-decay", type=float, default=None,
                   help="pin every neural memory's forgetting to sigmoid(B) per chunk: to_decay_factor weight 0, "
                        "bias B, not trained")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, val = load_bytes(os.path.join(args.data, "train.txt")), load_bytes(os.path.join(args.data, "val.txt"))
    vrng = random.Random(1234)
    val_windows = [make_window(val, args.seq_len + 1, vrng, 0.0, 0) for _ in range(args.val_windows)]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dict(CONFIG, model_type="titans_mac"), f, indent=4, sort_keys=True)
    model = MemoryAsContextTransformer(**{k: tuple(v) if isinstance(v, list) else v for k, v in CONFIG.items()})
    # heads > 1: memory_model_parameters.* are stride-0 views (einops.repeat) on the CPU, which no optimizer can
    # write to; materialise them (what .cuda() does in upstream's train_mac.py)
    for prm in model.parameters():
        prm.data = prm.data.clone()
    if args.init_from:
        model.load_state_dict(torch.load(args.init_from), assign=True)
        for prm in model.parameters():
            prm.data = prm.data.clone()
    if args.fix_decay is not None:
        for name, mod in model.named_modules():
            if name.endswith("to_decay_factor"):
                lin = mod[0]
                with torch.no_grad():
                    lin.weight.zero_()
                    lin.bias.fill_(args.fix_decay)
                lin.weight.requires_grad_(False)
                lin.bias.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    log = open(os.path.join(args.out, "log.txt"), "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"args {vars(args)}  params {n_params}  config {CONFIG}")
    t0 = time.time()
    deadline = t0 + 60 * args.minutes if args.minutes else float("inf")
    step = 0
    # linear warmup, then cosine decay to 10% over --steps
    last = min(args.steps, args.stop_after or args.steps)
    while step < last and time.time() < deadline:
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = np.stack([make_window(train, args.seq_len + 1, rng, args.p_copy, args.min_gap) for _ in range(args.batch_size)])
        loss = model(torch.from_numpy(batch.astype(np.int64)), return_loss=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        step += 1
        if step % 10 == 0:
            say(f"step {step}  loss {loss.item():.4f}  lr {lr:.2e}  elapsed {time.time() - t0:.0f}s")
        if step % args.val_every == 0 or time.time() >= deadline:
            vl = evaluate(model, val_windows)
            say(f"step {step}  val_loss {vl:.4f} nats/byte = {vl / math.log(2):.4f} bits/byte")
            tmp = os.path.join(args.out, "model.pt.tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, os.path.join(args.out, "model.pt"))
            with open(os.path.join(args.out, "val.json"), "w") as f:
                json.dump({"step": step, "val_loss": vl, "val_bpb": vl / math.log(2), "elapsed_s": time.time() - t0,
                           "params": n_params}, f, indent=2)
    vl = evaluate(model, val_windows)
    say(f"final step {step}  val_loss {vl:.4f} nats/byte = {vl / math.log(2):.4f} bits/byte")
    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    with open(os.path.join(args.out, "val.json"), "w") as f:
        json.dump({"step": step, "val_loss": vl, "val_bpb": vl / math.log(2), "elapsed_s": time.time() - t0,
                   "params": n_params}, f, indent=2)


if __name__ == "__main__":
    main()
