"""How much quantization (`python -m convert -q`) costs the demo model: bits/byte on held-out text, size on disk.

    apt-get install -y bible-kjv && python demo/prepare_corpus.py --out demo/data     # the held-out text, once
    python demo/check_quantization.py --model titans_mlx/demo_model

Each variant is written by the converter itself (`python -m convert --model ... [-q --q-bits B]`, groups of 64) into a
temporary directory and loaded back with titans_mlx.load. Text: windows spread evenly over the held-out split
(demo/data/val.txt), each scored as one sequence from its first byte. Prints, for float32, 8 and 4 bits, the bits/byte
with the memory learning and frozen (titans_mlx.memory_frozen; the gap is what the memory's writes are worth) and the
size of model.safetensors.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from titans_mlx import load, memory_frozen

ROOT = Path(__file__).resolve().parent.parent


def bits_per_byte(model, ids):
    logits = model(ids).astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.take_along_axis(lp[0, :-1], ids[0, 1:, None], axis=-1).mean().item() / math.log(2)


def convert(model, out, bits):
    quantize = [] if bits is None else ["-q", "--q-bits", str(bits)]
    subprocess.run([sys.executable, "-m", "convert", "--model", str(model), "--mlx-path", str(out), *quantize],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="titans_mlx/demo_model")
    p.add_argument("--val", default=os.path.join(os.path.dirname(__file__), "data", "val.txt"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--bytes", type=int, default=4096, help="bytes per window")
    args = p.parse_args()
    if not os.path.isfile(args.val):
        sys.exit(f"error: {args.val} not found; make it with: python demo/prepare_corpus.py --out demo/data")

    val = open(args.val, "rb").read()
    step = (len(val) - args.bytes) // max(1, args.windows - 1)
    windows = [mx.array([list(val[i * step:i * step + args.bytes])]) for i in range(args.windows)]
    print(f"held-out text: {args.windows} windows of {args.bytes} bytes from {args.val}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits in (("float32", None), ("8-bit", 8), ("4-bit", 4)):
            out = Path(tmp) / name
            convert(Path(args.model).absolute(), out, bits)
            model, _ = load(out)
            learning = sum(bits_per_byte(model, ids) for ids in windows) / len(windows)
            with memory_frozen(model):
                frozen = sum(bits_per_byte(model, ids) for ids in windows) / len(windows)
            size = (out / "model.safetensors").stat().st_size
            results[name] = learning
            change = f" ({100 * (learning / results['float32'] - 1):+.3f}% of float32)" if bits else ""
            print(f"{name}: {learning:.4f} bits/byte{change}, memory frozen {frozen:.4f} (the memory saves "
                  f"{frozen - learning:.4f}); model.safetensors {size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
