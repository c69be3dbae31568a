"""Validation bits/byte of a byte-level model on held-out KJV chapters, with its memory learning and frozen.

    python demo/valid_bpb.py --model titans_mlx/demo_model --text demo/data/val.txt --window 1536

Consecutive windows of --window bytes from the start of the held-out split (demo/prepare_corpus.py), each read in one
call from an empty cache, every byte after the first scored: the measure the demo model's card quotes. The same
windows for every model, so two models compare on the same bytes.
"""

import argparse
import json
import math

import mlx.core as mx
import numpy as np

from titans_mlx import load, memory_frozen


def bits_per_byte(model, windows: np.ndarray, batch: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = mx.array(windows[i : i + batch])
        logits = model(ids[:, :-1]).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(lp, ids[:, 1:, None], axis=-1)
        total += nll.sum().item()
        count += nll.size
    return total / count / math.log(2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="titans_mlx/demo_model")
    p.add_argument("--text", default="demo/data/val.txt")
    p.add_argument("--window", type=int, default=1536)
    p.add_argument("--windows", type=int, default=32, help="how many windows (default 32: 49,152 bytes)")
    args = p.parse_args()

    data = np.frombuffer(open(args.text, "rb").read(), dtype=np.uint8).astype(np.int32)
    n = min(args.windows, len(data) // args.window)
    windows = data[: n * args.window].reshape(n, args.window)
    model, _ = load(args.model)
    learning = bits_per_byte(model, windows)
    with memory_frozen(model):
        frozen = bits_per_byte(model, windows)
    print(json.dumps({"model": args.model, "windows": n, "window_bytes": args.window, "bits_per_byte": round(learning, 4),
                      "bits_per_byte_frozen_memory": round(frozen, 4)}))


if __name__ == "__main__":
    main()
