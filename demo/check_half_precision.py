"""How far a half-precision cast moves the demo model, with its memory learning and with it frozen.

    python demo/check_half_precision.py --model titans_mlx/demo_model

Text: the float32 model's own sample (seeded, temperature 0.8) from a fixed prompt, so it is in-distribution without
a corpus on disk. Casts as `python -m convert --dtype` does (the model's cast_predicate). Prints, per dtype, the
largest change of a single log-probability and the bits/byte, with test-time learning on and off
(titans_mlx.memory_frozen): a memory that adds no error of its own moves them no more than the frozen model does.
"""

import argparse
import math

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from titans_mlx import generate, load, memory_frozen


def log_probs(model, ids):
    logits = model(ids).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def bits_per_byte(lp, ids):
    target = ids[0, 1:, None]
    return -mx.take_along_axis(lp[0, :-1], target, axis=-1).mean().item() / math.log(2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="titans_mlx/demo_model")
    p.add_argument("--prompt", default="And God said unto Moses, ")
    p.add_argument("--bytes", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, tok = load(args.model)
    mx.random.seed(args.seed)
    text = generate(model, tok, args.prompt, max_tokens=args.bytes, sampler=make_sampler(0.8))
    ids = mx.array([tok.encode(text)[: args.bytes]])
    ref = log_probs(model, ids)
    with memory_frozen(model):
        ref_frozen = log_probs(model, ids)
    print(f"{ids.shape[1]} tokens; float32 bits/byte {bits_per_byte(ref, ids):.4f}, "
          f"memory frozen {bits_per_byte(ref_frozen, ids):.4f}")
    for dtype in (mx.bfloat16, mx.float16):
        half, _ = load(args.model)
        half.load_weights([(k, v.astype(dtype) if half.cast_predicate(k) else v)
                           for k, v in tree_flatten(half.parameters())])
        lp = log_probs(half, ids)
        with memory_frozen(half):
            lp_frozen = log_probs(half, ids)
        for name, a, b in (("memory learning", lp, ref), ("memory frozen", lp_frozen, ref_frozen)):
            change = 100 * (bits_per_byte(a, ids) / bits_per_byte(b, ids) - 1)
            print(f"{dtype}, {name}: largest log-probability change {mx.abs(a - b).max().item():.3f}, "
                  f"bits/byte {bits_per_byte(a, ids):.4f} ({change:+.2f}% of float32)")


if __name__ == "__main__":
    main()
