"""`python -m bench train`: tokens/s and peak memory of a MAC training step (forward with next-token loss, backward,
AdamW), titans_mlx against titans-pytorch on the same config, weights, batch and machine, plus the lone NeuralMemory
store's forward+backward FLOP/s against the same run's matmul FLOP/s. One worker process per (implementation,
config): bench/train_worker.py; report: bench/train_report.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench import env as E
from bench.flops import TRAIN_FLOPS_DOC
from bench.mac import MAC_CONFIG

ORDER = ("torch", "mlx")  # torch first: its initial weights feed the mlx worker

# titans-pytorch's train_mac.py model (README "Converting") with its two CUDA-only switches off: use_flex_attn (its CPU
# forward takes the dense path anyway) and use_accelerated_scan (a CUDA kernel of the same recurrence; on CPU it tries
# to build it and fails); titans_mlx ignores both
TRAIN_MAC = {"model_type": "titans_mac", "num_tokens": 256, "dim": 384, "depth": 8, "segment_len": 32,
             "num_persist_mem_tokens": 4, "num_longterm_mem_tokens": 4, "neural_memory_layers": [2, 4, 6],
             "neural_memory_segment_len": 4, "neural_memory_batch_size": 128, "neural_mem_weight_residual": True,
             "neural_memory_qkv_receives_diff_views": True, "use_flex_attn": False, "sliding_window_attn": True,
             "neural_memory_model": {"class": "MemoryMLP", "dim": 64, "depth": 2},
             "neural_memory_kwargs": {"dim_head": 64, "heads": 4, "attn_pool_chunks": True, "qk_rmsnorm": True,
                                      "momentum": True, "momentum_order": 1, "default_step_transform_max_lr": 0.1,
                                      "use_accelerated_scan": False, "per_parameter_lr_modulation": True,
                                      "spectral_norm_surprises": True}}

CONFIGS = {
    "small": MAC_CONFIG,  # the bench's small MAC (bench/mac.py)
    "train_mac": TRAIN_MAC,  # memory chunk 4 with spectral-norm surprises
    "chunk16": dict(TRAIN_MAC, neural_memory_segment_len=16),  # the paper's chunk 16, otherwise train_mac's
}
# train_mac.py trains with lr 2e-4 (its optimizer is AdoptAtan2; here AdamW on both sides, torch's defaults otherwise)
DEFAULT_LR = 2e-4


def add_parser(sub, int_list):
    m = sub.add_parser("train", help="MAC training step tokens/s and peak memory, titans_mlx vs titans-pytorch")
    m.add_argument("--configs", default="small,train_mac,chunk16",
                   help=f"comma list of {', '.join(CONFIGS)} or MAC config JSON files (default: all three)")
    m.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (loss on seq_len predictions)")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--depth", type=int, default=None,
                   help="override the configs' depth (memory layers beyond it are dropped); for quick runs")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation), default 2")
    m.add_argument("--steps", type=int, default=2, help="timed steps per repeat (default 2)")
    m.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    m.add_argument("--impl", default="auto", help="mlx, torch, or torch,mlx; auto = both when titans_pytorch is "
                                                  "importable by --torch-python")
    m.add_argument("--lr", type=float, default=DEFAULT_LR)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--blas", default="stock", help="stock, openblas or a libblas.so path (MLX worker)")
    m.add_argument("--torch-python", default=sys.executable, help="interpreter for the torch worker")
    m.add_argument("--matmul-size", type=int, default=2048, help="plain matmul probe size, 0 = skip (default 2048)")
    m.add_argument("--matmul-repeats", type=int, default=3)
    m.add_argument("--memory-repeats", type=int, default=3,
                   help="timed runs of the lone NeuralMemory forward+backward probe (mlx), 0 = skip (default 3)")
    m.add_argument("--checkpoint-layers", action="store_true", help="titans_mlx: model.checkpoint_layers = True")
    m.add_argument("--no-compile", action="store_true", help="titans_mlx: eager training step (not mx.compile'd)")
    m.add_argument("--same-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="give titans_mlx titans-pytorch's initial weights (default on)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--timeout", type=float, default=3600, help="seconds per worker (default 3600)")
    m.add_argument("--out", default=str(E.ROOT / "bench" / "results"))
    m.add_argument("--name", default=None, help="file stem (default train_<blas>_<configs>_s<seq>_b<batch>)")
    m.add_argument("--no-plot", action="store_true")
    return m


def resolve_configs(spec: str, depth, UserError) -> dict:
    out = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item in CONFIGS:
            cfg = json.loads(json.dumps(CONFIGS[item]))
            name = item
        elif item.endswith(".json"):
            try:
                with open(item) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"--configs: cannot read {item}: {e}")
            name = Path(item).stem
        else:
            raise UserError(f"--configs: unknown config {item!r}; choose from {', '.join(CONFIGS)} or a .json file")
        if depth is not None:
            cfg["depth"] = depth
            if cfg.get("neural_memory_layers") is not None:
                cfg["neural_memory_layers"] = [i for i in cfg["neural_memory_layers"] if i <= depth]
        out[name] = cfg
    if not out:
        raise UserError("--configs: no config given")
    return out


def run_train(args, argv, main) -> int:
    for name in ("seq_len", "batch", "steps", "repeats", "threads", "matmul_repeats"):
        if getattr(args, name) < 1:
            raise main.UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.matmul_size < 0 or args.memory_repeats < 0:
        raise main.UserError("--warmup, --matmul-size and --memory-repeats must be >= 0")
    if args.depth is not None and args.depth < 1:
        raise main.UserError("--depth must be >= 1")
    if not args.lr > 0:
        raise main.UserError("--lr must be > 0")
    configs = resolve_configs(args.configs, args.depth, main.UserError)
    impls = main._resolve_impls(args)
    blas_extra, blas_tag = main._blas_env(args)
    out_dir = main.make_out_dir(args)
    name = args.name or f"train_{blas_tag}_{'-'.join(configs)}_s{args.seq_len}_b{args.batch}"
    adam = {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}  # torch.optim.AdamW defaults
    doc = {"benchmark": "training_step", "schema": 1, "name": name, "environment": E.environment(argv),
           "config": {"configs": configs, "seq_len": args.seq_len, "batch": args.batch, "warmup": args.warmup,
                      "steps": args.steps, "repeats": args.repeats, "impls": impls, "threads": args.threads,
                      "blas": args.blas, "seed": args.seed, "optimizer": dict(adam, name="AdamW"),
                      "matmul_size": args.matmul_size, "memory_repeats": args.memory_repeats,
                      "checkpoint_layers": args.checkpoint_layers, "compile": not args.no_compile,
                      "same_weights": args.same_weights, "depth_override": args.depth,
                      "torch_python": args.torch_python if "torch" in impls else None},
           "blas_preload": {"mlx": blas_extra.get("LD_PRELOAD"), "torch": None},
           "flops_formula": TRAIN_FLOPS_DOC.strip(), "results": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="titans-bench-train-") as tmp:
        for cname, mac in configs.items():
            weights = None
            for impl in impls:
                cfg = dict(adam, impl=impl, config_name=cname, mac_config=mac, seq_len=args.seq_len, batch=args.batch,
                           warmup=args.warmup, steps=args.steps, repeats=args.repeats, seed=args.seed,
                           threads=args.threads, matmul_size=args.matmul_size, matmul_repeats=args.matmul_repeats,
                           memory_repeats=args.memory_repeats, checkpoint_layers=args.checkpoint_layers,
                           compile=not args.no_compile)
                if impl == "torch" and args.same_weights and "mlx" in impls:
                    cfg["export"] = weights = os.path.join(tmp, f"{cname}_weights.npz")
                if impl == "mlx" and weights and os.path.exists(weights):
                    cfg["weights"] = weights
                print(f"[bench] {impl:5s} {cname} ...", end="", flush=True, file=sys.stderr)
                res = _spawn(args, main, tmp, cfg, blas_extra if impl == "mlx" else {})
                doc["results"].append(res)
                if res.get("status") == "ok":
                    print(f" {res['median_step_s']:.2f} s/step, {res['tokens_per_s']:,.0f} tok/s, peak RSS "
                          f"+{(res['memory']['peak_rss_delta_bytes'] or 0) / 2**20:,.0f} MiB, first loss "
                          f"{res['first_loss']:.6f}", file=sys.stderr)
                else:
                    failed = True
                    print(f" FAILED: {res.get('error')}", file=sys.stderr)
    from bench import train_report
    main.publish(doc, out_dir / name, not args.no_plot, train_report)
    return 1 if failed else 0


def _spawn(args, main, tmp, cfg, extra_env) -> dict:
    python = args.torch_python if cfg["impl"] == "torch" else sys.executable
    res, why = E.run_worker("bench.train_worker", python, cfg, tmp, main._worker_env(extra_env, args.threads),
                            args.timeout)
    res = res if res is not None else {"status": "error", "error": why}
    res.setdefault("impl", cfg["impl"])
    res.setdefault("config", cfg["config_name"])
    res.pop("config_name", None)
    return res
