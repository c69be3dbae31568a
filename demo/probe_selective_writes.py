"""Could the demo model's memory hold a planted number if it wrote selectively? A what-if on its real keys and values.

Runs a trained model (titans-pytorch) on a 96-byte passage holding a random 6-digit number, G bytes of other text,
the passage again and some more text; captures each memory layer's keys (after their RMSNorm) and values; then
replays the memory's own update on them in float64 (a linear memory, each 36-token chunk's gradient of
sum_t step_t * mean((W k_t - v_{t+1})^2) taken at the weights the previous chunks left, forgetting 0.0067 per chunk,
no momentum), once with every token written at the same step and once writing the number (the space before it and
its first five digits, whose next tokens are digits) at a large step and every other token at a small one.

It reads the memory with each key of the second copy of the number and compares the read with the read in a control
run whose first copy carried a different number: a read that leans towards the right digit's value more than the
control's (the projection of the difference onto v_right - v_other, in units of the read's RMS) means the memory
still knows which number it was. Reports the mean lean and the share of digits where it points the right way, and
the steps the trained model itself chose for the number's tokens and for the rest.

    /work/venv-tp/bin/python demo/probe_selective_writes.py --torch demo/runs/kjv --gaps 1024,4096
"""

import argparse
import os
import random

import numpy as np
import torch

from eval_memory import DIGITS, NUMBER_LEN, with_number
from train_demo import load_run

CHUNK = 36  # the memory's chunk: segment 32 + 4 long-term tokens
FORGET = 0.0067  # sigmoid(-5), the decay the demo model starts from


def stream_index(i):
    """Where byte i sits in the memory's sequence: 4 long-term memory tokens precede every 32-byte segment."""
    return (i // 32) * CHUNK + 4 + i % 32


def capture(model, tokens):
    """Per memory layer: its keys, values and learned step sizes over the whole sequence, float64."""
    from titans_pytorch import NeuralMemory

    mems = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    got = {}
    hooks = [m.k_norm.register_forward_hook(lambda mod, i, o, li=li: got.setdefault((li, "k"), []).append(o))
             for li, m in enumerate(mems)]
    hooks += [m.to_values.register_forward_hook(lambda mod, i, o, li=li: got.setdefault((li, "v"), []).append(o))
              for li, m in enumerate(mems)]
    hooks += [m.to_adaptive_step.register_forward_hook(lambda mod, i, o, li=li: got.setdefault((li, "s"), []).append(o))
              for li, m in enumerate(mems)]
    with torch.no_grad():
        model(torch.tensor(tokens)[None])
    for h in hooks:
        h.remove()
    flat = lambda xs: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().numpy()
    steps = lambda li: np.concatenate([x.reshape(-1).double().numpy() for x in got[(li, "s")]])
    return [(flat(got[(li, "k")]), flat(got[(li, "v")]), steps(li)) for li in range(len(mems))]


def replay(k, v, steps):
    """Reads of a linear memory fed (k_t, v_{t+1}) chunk by chunk; each chunk is read before it is written."""
    d = k.shape[1]
    W, reads = np.zeros((d, d)), np.zeros_like(k)
    for c in range(0, (len(k) - 1) // CHUNK * CHUNK, CHUNK):
        K, V, s = k[c : c + CHUNK], v[c + 1 : c + CHUNK + 1], steps[c : c + CHUNK]
        reads[c : c + CHUNK] = K @ W.T
        W = (1 - FORGET) * W - (2 / d) * (s[:, None] * (K @ W.T - V)).T @ K
    return reads


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch", required=True, help="training run directory (config.json + model.pt)")
    p.add_argument("--val", default=os.path.join(os.path.dirname(__file__), "data", "val.txt"))
    p.add_argument("--gaps", default="1024,4096")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--uniform", type=float, default=0.05, help="step of every token when writing uniformly")
    p.add_argument("--selective", default="0.5,0.005", help="step of the number's tokens, step of all others")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, config = load_run(args.torch)
    max_lr = config["neural_memory_kwargs"]["default_step_transform_max_lr"]
    val = open(args.val, "rb").read()
    hi, lo = map(float, args.selective.split(","))

    for gap in map(int, args.gaps.split(",")):
        rng = random.Random(0)
        leans, learned = {}, {}
        for _ in range(args.trials):
            a, c = rng.randrange(0, len(val) - 96), rng.randrange(0, len(val) - gap - 80)
            P, at = with_number(list(val[a : a + 96]), rng)
            other = [int(DIGITS[(d - DIGITS[0] + rng.randrange(1, 10)) % 10]) for d in P[at : at + NUMBER_LEN]]
            P_other = P[:at] + other + P[at + NUMBER_LEN :]
            filler, tail = list(val[c : c + gap]), list(val[c + gap : c + gap + 80])
            seq = P + filler + P + tail
            runs = capture(model, seq), capture(model, P_other + filler + P + tail)
            keys_of_number = range(at - 1, at + NUMBER_LEN - 1)  # the space before it, digits 1-5: digits come next
            number_at = np.zeros(stream_index(len(seq)) + CHUNK, bool)
            number_at[[stream_index(i) for i in keys_of_number]] = True
            selective = np.where(number_at, hi, lo)
            for li, ((k, v, s), (kc, vc, _)) in enumerate(zip(*runs)):
                step = max_lr / (1 + np.exp(-s))  # the model's own step for each token (sigmoid * max lr)
                learned.setdefault(li, []).append((step[number_at[: len(step)]], step[~number_at[: len(step)]]))
                for name, steps in (("uniform", np.full_like(selective, args.uniform)), ("selective", selective)):
                    r, rc = replay(k, v, steps), replay(kc, vc, steps)
                    for i in keys_of_number:
                        first, second = stream_index(i), stream_index(96 + gap + i)
                        u = v[first + 1] - vc[first + 1]
                        u /= np.linalg.norm(u)
                        lean = (r[second] - rc[second]) @ u / (np.linalg.norm(rc[second]) / np.sqrt(len(u)))
                        leans.setdefault((name, li), []).append(lean)
        for (name, li), x in sorted(leans.items()):
            x = np.array(x)
            print(f"gap {gap}, memory layer {li + 2}, {name} writes "
                  f"({f'{args.uniform}' if name == 'uniform' else f'{hi} on the number, {lo} elsewhere'}): "
                  f"lean towards the right digit {x.mean():.2f} RMS, right way for {(x > 0).mean():.0%} of "
                  f"{len(x)} digits", flush=True)
        for li, pairs in sorted(learned.items()):
            on, off = (np.concatenate(x).mean() for x in zip(*pairs))
            print(f"gap {gap}, memory layer {li + 2}: the model's own mean step on the number's tokens {on:.4f}, "
                  f"on all others {off:.4f}", flush=True)


if __name__ == "__main__":
    main()
