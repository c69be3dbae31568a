"""Does the converted demo model give the PyTorch checkpoint's numbers? Bits/byte of held-out text under both.

    /work/venv-tp/bin/python demo/check_conversion.py --torch demo/runs/kjv --mlx titans_mlx/demo_model

Needs a python with both titans-pytorch and this package (the `parity` extra).
"""

import argparse
import math
import os

import numpy as np

from eval_memory import mlx_backend, torch_backend


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch", required=True, help="training run directory (config.json + model.pt)")
    p.add_argument("--mlx", required=True, help="converted model directory")
    p.add_argument("--val", default=os.path.join(os.path.dirname(__file__), "data", "val.txt"))
    p.add_argument("--bytes", type=int, default=2048)
    p.add_argument("--start", type=int, default=100_000)
    args = p.parse_args()

    tokens = list(open(args.val, "rb").read()[args.start : args.start + args.bytes + 1])
    target = np.array(tokens[1:])
    lps = {name: fn(tokens[:-1]) for name, fn in (("titans-pytorch", torch_backend(args.torch, 1)),
                                                     ("titans_mlx", mlx_backend(args.mlx)))}
    for name, lp in lps.items():
        bpb = -lp[np.arange(len(target)), target].mean() / math.log(2)
        print(f"{name}: {bpb:.5f} bits/byte on {len(target)} held-out bytes")
    diff = np.abs(lps["titans-pytorch"] - lps["titans_mlx"]).max()
    print(f"largest log-probability difference: {diff:.2e}")


if __name__ == "__main__":
    main()
