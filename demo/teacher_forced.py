"""Teacher-forced recall of a model dir: the cheap progress probe for a retrieval training run.

    python demo/teacher_forced.py --model demo/runs/passkey_warmup --tasks passkey --lengths 256,512,1024

For each task and length, --samples prompts from the evaluation harness's generators (titans_mlx.recall_tasks; seeds
offset by 10**6 from evaluate's, never a training seed), needle depth uniform in [0, 0.8] so that most needles lie
beyond the attention's reach. The model reads prompt + answer in one call; a sample is right when the argmax at every
answer token is that token (exact match), and the per-token accuracy is reported beside it, with memory learning and
with ``memory_frozen`` (a recall that survives freezing did not come from the memory). Greedy generation through
``python -m titans_mlx.evaluate`` is the measure of record; this only says whether a run is getting there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titans_mlx import load, memory_frozen  # noqa: E402
from titans_mlx.recall_tasks import make_sample, sentences_of  # noqa: E402

ANSWER = {"passkey": " {}.", "niah": " {}.", "vt": " {}", "babilong": " {}."}


def score(model, tokenizer, task, length, samples, seed, haystack):
    """(exact match, per-token accuracy) with memory learning and frozen, over `samples` prompts."""
    rows = []
    for i in range(samples):
        rng = random.Random(10**6 + seed * 1000 + i)
        sample = make_sample(task, tokenizer, length, rng.uniform(0, 0.8), rng, haystack)
        answer = tokenizer.encode(ANSWER[task].format(sample.answer))
        ids = list(sample.ids) + list(answer)
        x = mx.array([ids[:-1]])
        result = []
        for frozen in (False, True):
            if frozen:
                with memory_frozen(model):
                    logits = model(x)
            else:
                logits = model(x)
            guess = np.array(mx.argmax(logits[0, -len(answer):], axis=-1))
            hit = guess == np.array(answer)
            result.append((bool(hit.all()), float(hit.mean())))
        rows.append(result)
    a = np.array([[[em, tok] for em, tok in r] for r in rows])  # samples x (learning, frozen) x (em, tok)
    return a.mean(axis=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="passkey")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default="demo/data/val.txt", help="text for niah and babilong (held-out chapters)")
    p.add_argument("--out", help="append one JSON line of the results here")
    args = p.parse_args()
    model, tokenizer = load(args.model)
    haystack = sentences_of(Path(args.haystack).read_text())
    results = {}
    for task in args.tasks.split(","):
        for length in map(int, args.lengths.split(",")):
            m = score(model, tokenizer, task, length, args.samples, args.seed,
                      haystack if task in ("niah", "babilong") else None)
            results[f"{task}@{length}"] = {"em": m[0, 0], "token_acc": m[0, 1], "em_frozen": m[1, 0],
                                           "token_acc_frozen": m[1, 1]}
            print(f"{task:9s} {length:6d}  EM {m[0, 0]:6.1%}  tokens {m[0, 1]:6.1%}   "
                  f"frozen: EM {m[1, 0]:6.1%}  tokens {m[1, 1]:6.1%}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"model": args.model, "samples": args.samples, **results}) + "\n")


if __name__ == "__main__":
    main()
