"""`python -m bench mac`: MAC prefill and decode against context depth (llama-bench naming), peak memory against
context, titans_mlx vs titans-pytorch vs a plain mlx-lm llama with a KV cache. One worker process per
(implementation, depth): bench/mac_worker.py."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from bench import env as E

NAMES = {"mlx": "titans_mlx MAC", "torch": "titans-pytorch MAC", "llama": "mlx-lm llama (KV cache)"}
ORDER = ("torch", "mlx", "llama")

# small MAC for CPU speed runs: the checkpoint config of the research notes (§4.2) in sliding-window mode, where
# titans-pytorch's cached decode is valid (in block mode it drops the current window, see titans_mlx/mac.py)
MAC_CONFIG = {"model_type": "titans_mac", "num_tokens": 256, "dim": 256, "depth": 2, "segment_len": 32,
              "num_persist_mem_tokens": 4, "num_longterm_mem_tokens": 4, "neural_memory_layers": [1, 2],
              "sliding_window_attn": True}


def llama_config(mac: dict) -> dict:
    """A plain transformer of the MAC's width, depth, attention and feed-forward sizes, without the memory."""
    heads = mac.get("heads", 8)
    return {"model_type": "llama", "hidden_size": mac["dim"], "num_hidden_layers": mac["depth"],
            "intermediate_size": int(mac["dim"] * mac.get("ff_mult", 4) * 2 / 3), "num_attention_heads": heads,
            "head_dim": mac.get("dim_head", 64), "num_key_value_heads": heads, "rms_norm_eps": 1e-5,
            "vocab_size": mac["num_tokens"], "tie_word_embeddings": False, "rope_theta": 10000.0}


def add_parser(sub, int_list):
    m = sub.add_parser("mac", help="MAC prefill/decode tokens/s and peak memory against context depth")
    m.add_argument("--depths", type=int_list, default=[1024, 4096, 16384, 32768, 65536, 131072],
                   help="comma list of context depths (default 1K..128K)")
    m.add_argument("--tg", type=int, default=128, help="tokens decoded after the context (default 128: tg128)")
    m.add_argument("--impl", default="auto", help="comma list of mlx, torch, llama; auto = all available")
    m.add_argument("--torch-max-depth", type=int, default=16384,
                   help="run titans-pytorch only up to this depth (its prefill is one parallel forward whose memory "
                        "grows with the prompt; default 16384); larger depths are recorded as skipped")
    m.add_argument("--llama-max-depth", type=int, default=32768,
                   help="run the mlx-lm llama reference only up to this depth (its prefill attention is quadratic: "
                        "at 128K a 2048-token block's scores alone are 8.6 GB; default 32768)")
    m.add_argument("--prefill-step", type=int, default=2048, help="prefill block (default 2048, as mlx-lm)")
    m.add_argument("--config", default=None, help="MAC config JSON file, or the name of one of `bench train`'s "
                                                  "(small, train_mac, chunk16) (default: a small built-in one, see "
                                                  "bench/mac.py)")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--blas", default="stock", help="stock, openblas or a libblas.so path (MLX workers)")
    m.add_argument("--torch-python", default=sys.executable)
    m.add_argument("--matmul-size", type=int, default=1024, help="plain matmul probe size, 0 = skip")
    m.add_argument("--same-weights", action="store_true", default=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--timeout", type=float, default=1800)
    m.add_argument("--out", default=str(E.ROOT / "bench" / "results"))
    m.add_argument("--name", default=None, help="file stem (default mac_<blas>_d<depths>)")
    m.add_argument("--no-plot", action="store_true")
    m.add_argument("--no-compile-decode", action="store_true",
                   help="decode every token through the general forward, not the compiled step (titans_mlx.decode)")
    return m


def run_mac(args, argv, main) -> int:
    if args.tg < 1 or args.threads < 1 or args.prefill_step < 1 or args.matmul_size < 0:
        raise main.UserError("--tg, --threads and --prefill-step must be >= 1")
    cfg_mac = dict(MAC_CONFIG)
    from bench.train import CONFIGS as TRAIN_CONFIGS
    if args.config in TRAIN_CONFIGS:  # a config of `python -m bench train` by name (small, train_mac, chunk16)
        cfg_mac = dict(TRAIN_CONFIGS[args.config])
    elif args.config:
        try:
            with open(args.config) as f:
                cfg_mac = json.load(f)
        except (OSError, ValueError) as e:
            raise main.UserError(f"--config: cannot read {args.config}: {e}")
    # titans-pytorch has only its own MAC: the paper's variants (titans_mag/mal/lmm, paper_order) run without it
    pytorch_has_it = cfg_mac.get("model_type", "titans_mac") == "titans_mac" and not cfg_mac.get("paper_order")
    if args.impl == "auto":
        impls = ["mlx", "llama"] + (["torch"] if pytorch_has_it and main._has_module(args.torch_python,
                                                                                      "titans_pytorch") else [])
    else:
        impls = [i.strip() for i in args.impl.split(",") if i.strip()]
        bad = [i for i in impls if i not in ORDER]
        if bad or not impls:
            raise main.UserError(f"--impl: unknown implementation {bad or args.impl!r}; choose from mlx, torch, llama")
        if "torch" in impls and not pytorch_has_it:
            raise main.UserError(f"--impl torch: titans-pytorch has no {cfg_mac.get('model_type')!r}"
                                 f"{' in the paper order' if cfg_mac.get('paper_order') else ''}")
        if "torch" in impls and not main._has_module(args.torch_python, "titans_pytorch"):
            raise main.UserError(f"--impl torch: titans_pytorch is not importable by {args.torch_python}")
    impls = [i for i in ORDER if i in impls]
    blas_extra, blas_tag = main._blas_env(args)
    out_dir = main.make_out_dir(args)
    name = args.name or f"mac_{blas_tag}_d{'-'.join(str(d // 1024) + 'k' if d % 1024 == 0 else str(d) for d in args.depths)}"
    doc = {"benchmark": "mac_context_depth", "schema": 1, "name": name, "environment": E.environment(argv),
           "config": {"depths": args.depths, "tg": args.tg, "impls": impls, "torch_max_depth": args.torch_max_depth,
                      "llama_max_depth": args.llama_max_depth,
                      "prefill_step": args.prefill_step, "threads": args.threads, "blas": args.blas,
                      "seed": args.seed, "mac_config": cfg_mac, "llama_config": llama_config(cfg_mac),
                      "compile_decode": not args.no_compile_decode},
           "blas_preload": {"mlx": blas_extra.get("LD_PRELOAD"), "torch": None}, "results": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="titans-bench-mac-") as tmp:
        weights = None
        base = {"seed": args.seed, "tg": args.tg, "threads": args.threads, "prefill_step": args.prefill_step,
                "matmul_size": args.matmul_size, "vocab": cfg_mac["num_tokens"], "mac_config": cfg_mac,
                "llama_config": llama_config(cfg_mac), "compile_decode": not args.no_compile_decode}
        if "torch" in impls and "mlx" in impls and args.same_weights:
            weights = os.path.join(tmp, "mac_weights.npz")
            res = _spawn(args, main, tmp, dict(base, impl="torch", depth=0, export=weights), "torch", {})
            if res.get("status") != "ok":
                print(f"[bench] exporting titans-pytorch weights failed: {res.get('error')}", file=sys.stderr)
                weights = None
        for depth in args.depths:
            for impl in impls:
                limit = {"torch": args.torch_max_depth, "llama": args.llama_max_depth}.get(impl)
                if limit is not None and depth > limit:
                    flag = "--torch-max-depth" if impl == "torch" else "--llama-max-depth"
                    doc["results"].append({"impl": impl, "depth": depth, "status": "skipped",
                                           "error": f"not run above {flag} {limit}"})
                    continue
                cfg = dict(base, impl=impl, depth=depth, weights=weights if impl == "mlx" else None)
                print(f"[bench] {impl:5s} depth={depth} ...", end="", flush=True, file=sys.stderr)
                res = _spawn(args, main, tmp, cfg, impl, blas_extra if impl != "torch" else {})
                doc["results"].append(res)
                if res.get("status") == "ok":
                    print(f" prefill {res['prefill_tokens_per_s']:,.0f} tok/s, decode {res['decode_tokens_per_s']:.1f}"
                          f" tok/s, peak RSS +{(res['memory']['peak_rss_delta_bytes'] or 0) / 2**20:.0f} MiB",
                          file=sys.stderr)
                else:
                    failed = True
                    print(f" FAILED: {res.get('error')}", file=sys.stderr)
    from bench import mac_report
    main.publish(doc, out_dir / name, not args.no_plot, mac_report)
    return 1 if failed else 0


def _spawn(args, main, tmp, cfg, impl, extra_env) -> dict:
    python = args.torch_python if impl == "torch" else sys.executable
    res, why = E.run_worker("bench.mac_worker", python, cfg, tmp, main._worker_env(extra_env, args.threads),
                            args.timeout)
    return res if res is not None else {"impl": impl, "depth": cfg["depth"], "status": "error", "error": why}
