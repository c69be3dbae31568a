"""Does the demo model use its neural memory? Recall of a passage planted thousands of tokens back.

For each trial a 128-byte passage P of held-out text is followed by G bytes of other held-out text and then P again.
The control run is identical except that the first P is replaced by an unrelated passage Q of the same length:

    repeat:  P  + filler(G) + P        control:  Q  + filler(G) + P

Attention reaches at most a few hundred positions back (sliding windows of segment + long-term tokens, over the
layers), so for G in the thousands only the neural memory can carry P forward: any drop in loss on the final P in
the repeat run versus the control is memory recall. Reports bits/byte and top-1 accuracy on the final P.

    /work/venv-tp/bin/python demo/eval_memory.py --torch demo/runs/kjv                # the titans-pytorch checkpoint
    python demo/eval_memory.py --mlx titans_mlx/demo_model                             # the converted model (MLX)
"""

import argparse
import json
import math
import os
import random

import numpy as np


def torch_backend(run_dir, threads, memory_learning=True):
    import torch

    from titans_pytorch import MemoryAsContextTransformer

    torch.set_num_threads(threads)
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("model_type", None)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    model = MemoryAsContextTransformer(**cfg)
    model.load_state_dict(torch.load(os.path.join(run_dir, "model.pt")), assign=True)
    model.eval()
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
        logits = model(mx.array(tokens, dtype=mx.int32)[None])[0].astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(np.float64)

    return logprobs


def score(logprobs, seq, n):
    """bits/byte and top-1 accuracy of the last n bytes of seq."""
    lp = logprobs(seq)[-n - 1 : -1]
    target = np.array(seq[-n:])
    nll = -lp[np.arange(n), target]
    return nll.mean() / math.log(2), float((lp.argmax(-1) == target).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", help="training run directory (config.json + model.pt)")
    src.add_argument("--mlx", help="converted model directory")
    p.add_argument("--val", default=os.path.join(os.path.dirname(__file__), "data", "val.txt"))
    p.add_argument("--gaps", default="1024,4096")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--passage", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--ablation", action="store_true",
                   help="(--torch) also: bits/byte of held-out text with the memory's test-time learning on vs off")
    args = p.parse_args()

    logprobs = torch_backend(args.torch, args.threads) if args.torch else mlx_backend(args.mlx)
    val = open(args.val, "rb").read()
    n = args.passage
    results = {}
    for gap in map(int, args.gaps.split(",")):
        rng = random.Random(args.seed)
        rows = []
        for _ in range(args.trials):
            a, b, c = (rng.randrange(0, len(val) - gap - 1) for _ in range(3))
            P, Q, F = list(val[a : a + n]), list(val[b : b + n]), list(val[c : c + gap])
            rep = score(logprobs, P + F + P, n)
            ctl = score(logprobs, Q + F + P, n)
            rows.append(rep + ctl)
            print(f"gap {gap}: repeat {rep[0]:.3f} bpb acc {rep[1]:.3f} | control {ctl[0]:.3f} bpb acc {ctl[1]:.3f}",
                  flush=True)
        r = np.array(rows)
        d = r[:, 2] - r[:, 0]
        results[gap] = dict(
            repeat_bpb=r[:, 0].mean(), control_bpb=r[:, 2].mean(), repeat_acc=r[:, 1].mean(), control_acc=r[:, 3].mean(),
            bpb_saved=d.mean(), bpb_saved_stderr=d.std(ddof=1) / math.sqrt(len(d)), trials_better=int((d > 0).sum()),
            trials=len(d),
        )
        s = results[gap]
        print(f"== gap {gap} bytes: final passage {s['repeat_bpb']:.3f} bits/byte after a planted copy vs "
              f"{s['control_bpb']:.3f} without (saves {s['bpb_saved']:.5f} +- {s['bpb_saved_stderr']:.5f}; better in "
              f"{s['trials_better']}/{s['trials']} trials); top-1 accuracy {s['repeat_acc']:.3f} vs {s['control_acc']:.3f}",
              flush=True)
    if args.ablation and args.torch:
        rng = random.Random(args.seed)
        n, skip = 2048, 512
        wins = [list(val[s : s + n + 1]) for s in (rng.randrange(0, len(val) - n - 1) for _ in range(args.trials))]
        out = {}
        for on in (True, False):
            lp_fn = torch_backend(args.torch, args.threads, memory_learning=on)
            out[on] = np.mean([score(lp_fn, w, n - skip)[0] for w in wins])
        results["ablation"] = dict(bpb_memory_learning_on=out[True], bpb_memory_learning_off=out[False],
                                   bpb_saved=out[False] - out[True], windows=len(wins), window_bytes=n, scored_from=skip)
        print(f"== held-out text ({len(wins)} windows of {n} bytes, scored from byte {skip}): {out[True]:.4f} bits/byte "
              f"with test-time learning, {out[False]:.4f} with the memories frozen at their learned initial weights "
              f"(saves {out[False] - out[True]:.4f})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({str(k): {kk: float(vv) for kk, vv in v.items()} for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
