"""Does the demo model use its neural memory? Recall of a number and of a passage planted thousands of tokens back.

Attention reaches about 110 positions back (sliding windows of segment + long-term tokens over three layers), so for
gaps in the thousands only the neural memory can carry anything forward. Two probes, each against a control run that
is identical except for the planted text:

* number: a 96-byte held-out passage P holding a random 6-digit number, G bytes of other held-out text, then P again.
  The digits of the second number can only be known from the first. Reports how often the most likely of the ten
  digits is the right one (chance: 1 in 10) and how often all six are (then greedy decoding writes the number back,
  if it writes digits at all), and how much more likely the right digits are than in a control run whose first P
  carries a different number.
* passage: a 128-byte held-out passage P, G bytes of other text, then P again, against a control where the first P is
  replaced by an unrelated passage; bits/byte and top-1 accuracy on the final P.

    python demo/eval_memory.py --mlx titans_mlx/demo_model --out demo/results/memory_eval.json   # the shipped model
    /work/venv-tp/bin/python demo/eval_memory.py --torch demo/runs/kjv --ablation                # the PyTorch run

`--ablation` (PyTorch only) also scores held-out text with the memory's test-time learning switched off.
"""

import argparse
import json
import math
import os
import random

import numpy as np

NUMBER_LEN = 6
DIGITS = np.arange(ord("0"), ord("9") + 1)


def torch_backend(run_dir, threads, memory_learning=True):
    import torch

    from train_demo import load_run

    torch.set_num_threads(threads)
    model, _ = load_run(run_dir)
    if not memory_learning:  # test-time learning off: every memory keeps its learned initial weights
        for name, mod in model.named_modules():
            if name.endswith("to_adaptive_step"):
                mod.register_forward_hook(lambda mod, inp, out: out - 1e4)  # step size sigmoid(-1e4) = 0

    def logprobs(tokens):
        with torch.no_grad():
            logits = model(torch.tensor(tokens, dtype=torch.long)[None])[0].double()
        return torch.log_softmax(logits, -1).numpy()

    return logprobs


def mlx_backend(model_dir):
    import mlx.core as mx

    from titans_mlx.io import load

    model, _ = load(model_dir)

    def logprobs(tokens):
        logits = model(mx.array(np.array(tokens, dtype=np.int32))[None])[0].astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(np.float64)

    return logprobs


def score(logprobs, seq, positions):
    """bits/byte and top-1 hits of seq's bytes at the given positions."""
    lp = logprobs(seq)[np.asarray(positions) - 1]
    target = np.array(seq)[positions]
    return -lp[np.arange(len(positions)), target].mean() / math.log(2), lp.argmax(-1) == target


def with_number(text, rng):
    """text with a random NUMBER_LEN-digit number (spaces around it) written over its middle; returns it and where."""
    at = rng.randrange(8, len(text) - NUMBER_LEN - 8)
    number = [int(DIGITS[rng.randrange(10)]) for _ in range(NUMBER_LEN)]
    return text[: at - 1] + [32] + number + [32] + text[at + NUMBER_LEN + 1 :], at


def digit_guesses(logprobs, seq, positions):
    """At each position: is the most likely of the ten digits the right one, and the right digit's log2-probability."""
    lp = logprobs(seq)[np.asarray(positions) - 1][:, DIGITS]
    right = np.array(seq)[positions] - DIGITS[0]
    return lp.argmax(-1) == right, lp[np.arange(len(positions)), right] / math.log(2)


def number_probe(logprobs, val, gap, trials, seed):
    rng = random.Random(seed)
    rows = []
    for t in range(trials):
        a, c = rng.randrange(0, len(val) - 96), rng.randrange(0, len(val) - gap)
        P, at = with_number(list(val[a : a + 96]), rng)
        other = [int(DIGITS[(d - DIGITS[0] + rng.randrange(1, 10)) % 10]) for d in P[at : at + NUMBER_LEN]]
        P_other = P[:at] + other + P[at + NUMBER_LEN :]
        F = list(val[c : c + gap])
        digits = [96 + gap + at + i for i in range(NUMBER_LEN)]
        hit, lp = digit_guesses(logprobs, P + F + P, digits)
        hit_c, lp_c = digit_guesses(logprobs, P_other + F + P, digits)
        rows.append((hit, hit_c, lp, lp_c))
        print(f"number gap {gap} trial {t}: {bytes(P[at:at + NUMBER_LEN]).decode()}: {int(hit.sum())}/{NUMBER_LEN} digits "
              f"(control {int(hit_c.sum())}/{NUMBER_LEN}), log2 p {lp.mean():.2f} (control {lp_c.mean():.2f})", flush=True)
    hit, hit_c, lp, lp_c = (np.array(x) for x in zip(*rows))
    gain = (lp - lp_c).mean(1)  # bits per digit, per trial
    r = dict(digit_acc=hit.mean(), digit_acc_control=hit_c.mean(), digit_acc_chance=0.1, whole_number=hit.all(1).mean(),
             whole_number_control=hit_c.all(1).mean(), bits_per_digit_gained=gain.mean(),
             bits_per_digit_gained_stderr=gain.std(ddof=1) / math.sqrt(trials), trials_better=int((gain > 0).sum()),
             trials=trials)
    print(f"== number, gap {gap} bytes: best-guess digit right {r['digit_acc']:.3f} (control {r['digit_acc_control']:.3f},"
          f" chance 0.100); whole number in {int(hit.all(1).sum())}/{trials} (control {int(hit_c.all(1).sum())}/{trials}); "
          f"the right digits {r['bits_per_digit_gained']:.3f} +- {r['bits_per_digit_gained_stderr']:.3f} bits more likely "
          f"than after a different number (better in {r['trials_better']}/{trials} trials)", flush=True)
    return r


def passage_probe(logprobs, val, gap, trials, seed, n=128):
    rng = random.Random(seed)
    rows = []
    for _ in range(trials):
        a, b, c = (rng.randrange(0, len(val) - gap - 1) for _ in range(3))
        P, Q, F = list(val[a : a + n]), list(val[b : b + n]), list(val[c : c + gap])
        last = list(range(n + gap, 2 * n + gap))
        rep, ctl = score(logprobs, P + F + P, last), score(logprobs, Q + F + P, last)
        rows.append((rep[0], rep[1].mean(), ctl[0], ctl[1].mean()))
        print(f"passage gap {gap}: repeat {rows[-1][0]:.3f} bpb acc {rows[-1][1]:.3f} | "
              f"control {rows[-1][2]:.3f} bpb acc {rows[-1][3]:.3f}", flush=True)
    r = np.array(rows)
    d = r[:, 2] - r[:, 0]
    s = dict(repeat_bpb=r[:, 0].mean(), control_bpb=r[:, 2].mean(), repeat_acc=r[:, 1].mean(),
             control_acc=r[:, 3].mean(), bpb_saved=d.mean(), bpb_saved_stderr=d.std(ddof=1) / math.sqrt(len(d)),
             trials_better=int((d > 0).sum()), trials=len(d))
    print(f"== passage, gap {gap} bytes: {s['repeat_bpb']:.3f} bits/byte after a planted copy vs "
          f"{s['control_bpb']:.3f} without (saves {s['bpb_saved']:.3f} +- {s['bpb_saved_stderr']:.3f}; better in "
          f"{s['trials_better']}/{s['trials']} trials); top-1 accuracy {s['repeat_acc']:.3f} vs {s['control_acc']:.3f}",
          flush=True)
    return s


def ablation(run_dir, threads, val, trials, seed, n=2048, skip=512):
    rng = random.Random(seed)
    wins = [list(val[s : s + n]) for s in (rng.randrange(0, len(val) - n) for _ in range(trials))]
    bpb = {}
    for on in (True, False):
        logprobs = torch_backend(run_dir, threads, memory_learning=on)
        bpb[on] = np.mean([score(logprobs, w, list(range(skip, n)))[0] for w in wins])
    print(f"== held-out text ({len(wins)} windows of {n} bytes, scored from byte {skip}): {bpb[True]:.4f} bits/byte "
          f"with test-time learning, {bpb[False]:.4f} with the memories frozen at their learned initial weights "
          f"(saves {bpb[False] - bpb[True]:.4f})", flush=True)
    return dict(bpb_memory_learning_on=bpb[True], bpb_memory_learning_off=bpb[False], bpb_saved=bpb[False] - bpb[True],
                windows=len(wins), window_bytes=n, scored_from=skip)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", help="training run directory (config.json + model.pt)")
    src.add_argument("--mlx", help="converted model directory")
    p.add_argument("--val", default=os.path.join(os.path.dirname(__file__), "data", "val.txt"))
    p.add_argument("--gaps", default="1024,2048,4096")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--ablation", action="store_true",
                   help="(--torch) also: bits/byte of held-out text with the memory's test-time learning on vs off")
    args = p.parse_args()

    logprobs = torch_backend(args.torch, args.threads) if args.torch else mlx_backend(args.mlx)
    val = open(args.val, "rb").read()
    results = {}
    for gap in map(int, args.gaps.split(",")):
        results[f"number_gap{gap}"] = number_probe(logprobs, val, gap, args.trials, args.seed)
        results[f"passage_gap{gap}"] = passage_probe(logprobs, val, gap, args.trials, args.seed)
    if args.ablation and args.torch:
        results["ablation"] = ablation(args.torch, args.threads, val, args.trials, args.seed)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: {kk: float(vv) for kk, vv in v.items()} for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
