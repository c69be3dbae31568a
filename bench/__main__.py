"""Benchmarks of titans_mlx against titans-pytorch, run from the repository root.

    python -m bench [memory] [--seq-lens 4096] [--chunk 64] [--blas stock|openblas|PATH] ...
    python -m bench mac [--depths 1024,...,131072] [--impl mlx,torch,llama] [--blas openblas] ...
                                                        # MAC prefill/decode/peak memory vs context (bench/mac.py)
    python -m bench train [--configs small,train_mac,chunk16] [--seq-len 512] [--batch 1] [--blas openblas] ...
                                                        # MAC training step tokens/s and memory (bench/train.py)
    python -m bench serve [--tokens 32768] [--modes completions,chat] [--blas openblas]
                                                        # mlx_lm.server time to first token, first turn vs
                                                        # follow-ups on the cached state (bench/serve.py)
    python -m bench report bench/results/NAME.json      # redo the .md/.png from a .json
    python -m bench env                                 # print the environment record

Each (implementation, sequence length, chunk) runs in its own worker process (bench/worker.py), one after
another, torch first; results go to OUT/NAME.json, OUT/NAME.md and (with matplotlib) OUT/NAME.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import env as E
from bench import profile as P
from bench.flops import neural_memory_flops
from bench.report import comparisons, form_comparisons, markdown, plot

DEFAULT_OUT = E.ROOT / "bench" / "results"
IMPLS = ("torch", "mlx", "mlx-loop")  # mlx-loop: titans_mlx with the dual form off (memory_step.DUAL_FORM)


class UserError(Exception):
    pass


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("memory", help="NeuralMemory store+retrieve, titans_mlx vs titans-pytorch")
    m.add_argument("--seq-lens", type=_int_list, default=[4096], help="comma list of sequence lengths (default 4096)")
    m.add_argument("--chunk", type=_int_list, default=[64], help="comma list of chunk sizes (default 64; paper: 16)")
    m.add_argument("--dim", type=int, default=384)
    m.add_argument("--heads", type=int, default=1)
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--impl", default="auto",
                   help="comma list of mlx, torch, mlx-loop (titans_mlx with the store's dual form off); "
                        "auto (default) = mlx and torch when titans_pytorch is importable")
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--threads", type=int, default=1,
                   help="threads for torch (set_num_threads) and for the BLAS of MLX (OPENBLAS_NUM_THREADS) (default 1)")
    m.add_argument("--blas", default="stock",
                   help="BLAS for the MLX worker: stock (the wheel's own), openblas (LD_PRELOAD the system "
                        "OpenBLAS; Debian: apt-get install libopenblas0-pthread), or a path to a libblas.so")
    m.add_argument("--torch-python", default=sys.executable,
                   help="interpreter for the torch worker (default: this one)")
    m.add_argument("--matmul-size", type=int, default=2048, help="plain matmul probe size, 0 = skip (default 2048)")
    m.add_argument("--matmul-repeats", type=int, default=3)
    m.add_argument("--same-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="give titans_mlx titans-pytorch's weights and input and report the output difference")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--timeout", type=float, default=1800, help="seconds per worker (default 1800)")
    m.add_argument("--torch-max-gb", type=float, default=None,
                   help="skip titans-pytorch where its estimated peak memory (16·n·d·4d·4 B / C, fitted to measured "
                        "runs) exceeds this many GB (default: half of this machine's RAM); the skip is recorded")
    m.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    m.add_argument("--name", default=None, help="file stem (default memory_<blas>_n<lens>_c<chunks>_d<dim>)")
    m.add_argument("--no-plot", action="store_true")
    m.add_argument("--no-compile", action="store_true",
                   help="run the MLX worker with MLX_DISABLE_COMPILE=1 (mx.compile becomes a no-op)")
    m.add_argument("--profile", action="store_true",
                   help="sample the timed runs with Linux perf and report where the time goes (timings are then "
                        "perturbed; name is suffixed _profile)")

    from bench.mac import add_parser as _add_mac
    _add_mac(sub, _int_list)
    from bench.train import add_parser as _add_train
    _add_train(sub, _int_list)
    from bench.serve import add_parser as _add_serve
    _add_serve(sub, _int_list)

    r = sub.add_parser("report", help="rewrite the .md (and .png) next to benchmark JSON files")
    r.add_argument("json", nargs="+")
    sub.add_parser("env", help="print the environment record as JSON")
    return p


def _has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _resolve_impls(args) -> list[str]:
    if args.impl == "auto":
        return ["torch", "mlx"] if _has_module(args.torch_python, "titans_pytorch") else ["mlx"]
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        raise UserError(f"--impl: unknown implementation {bad or args.impl!r}; choose from {', '.join(IMPLS)}")
    if "torch" in impls and not _has_module(args.torch_python, "titans_pytorch"):
        raise UserError(f"--impl torch: titans_pytorch is not importable by {args.torch_python} "
                        "(pip install -e '.[parity]', or pass --torch-python)")
    return [i for i in IMPLS if i in impls]  # torch first: its weights/input feed the mlx worker


def _blas_env(args) -> tuple[dict, str]:
    if args.blas == "stock":
        return {}, "stock"
    if args.blas == "openblas":
        if not sys.platform.startswith("linux"):
            raise UserError("--blas openblas: only on Linux (macOS MLX uses Accelerate)")
        path = E.find_openblas()
        if not path:
            raise UserError("--blas openblas: no OpenBLAS found; install it (Debian/Ubuntu: apt-get install -y "
                            "libopenblas0-pthread) or pass --blas /path/to/libblas.so.3")
        return {"LD_PRELOAD": path}, "openblas"
    if not os.path.isfile(args.blas):
        raise UserError(f"--blas: no such file {args.blas!r} (expected stock, openblas or a library path)")
    return {"LD_PRELOAD": os.path.abspath(args.blas)}, Path(args.blas).name.split(".")[0]


def _worker_env(extra: dict, threads: int) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(extra)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(E.ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_memory(args, argv) -> int:
    for name in ("dim", "heads", "batch", "repeats", "threads", "matmul_repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.matmul_size < 0:
        raise UserError("--warmup and --matmul-size must be >= 0")
    if args.profile and not P.available():
        raise UserError("--profile needs Linux perf on PATH (Debian: apt-get install linux-perf)")
    impls = _resolve_impls(args)
    blas_extra, blas_tag = _blas_env(args)
    out_dir = make_out_dir(args)
    name = args.name or (f"memory_{blas_tag}_n{'-'.join(map(str, args.seq_lens))}"
                         f"_c{'-'.join(map(str, args.chunk))}_d{args.dim}") + ("_nocompile" if args.no_compile else "") + ("_profile" if args.profile else "")

    doc = {"benchmark": "neural_memory_store_retrieve", "schema": 1, "name": name,
           "environment": E.environment(argv),
           "config": {k: getattr(args, k) for k in ("seq_lens", "chunk", "dim", "heads", "batch", "warmup", "repeats",
                                                    "threads", "blas", "matmul_size", "matmul_repeats",
                                                    "same_weights", "seed", "profile", "no_compile")},
           "blas_preload": {"mlx": blas_extra.get("LD_PRELOAD"), "torch": None},
           "flops_formula": sys.modules["bench.flops"].__doc__.strip(),
           "results": []}
    doc["config"]["impls"] = impls
    doc["config"]["torch_python"] = args.torch_python if "torch" in impls else None

    total = E.total_memory_bytes()
    torch_max = args.torch_max_gb * 1e9 if args.torch_max_gb is not None else (total / 2 if total else None)
    doc["config"]["torch_max_bytes"] = torch_max
    failed = False
    with tempfile.TemporaryDirectory(prefix="titans-bench-") as tmp:
        for n in args.seq_lens:
            for c in args.chunk:
                ref = None
                for impl in impls:
                    est = torch_peak_estimate(n, args.dim, c, args.batch)
                    if impl == "torch" and torch_max and est > torch_max:
                        doc["results"].append({"impl": impl, "seq_len": n, "chunk": c, "status": "skipped",
                                               "estimated_peak_bytes": est,
                                               "error": f"not run: estimated peak memory {est / 1e9:.0f} GB > "
                                                        f"limit {torch_max / 1e9:.0f} GB (--torch-max-gb)"})
                        print(f"[bench] torch n={n} C={c} skipped (estimated {est / 1e9:.0f} GB)", file=sys.stderr)
                        continue
                    cfg = {"impl": impl, "seq_len": n, "chunk": c, "dim": args.dim, "heads": args.heads,
                           "batch": args.batch, "warmup": args.warmup, "repeats": args.repeats,
                           "threads": args.threads, "seed": args.seed, "matmul_size": args.matmul_size,
                           "matmul_repeats": args.matmul_repeats}
                    if impl == "torch" and args.same_weights and len(impls) > 1:
                        cfg["export"] = ref = os.path.join(tmp, f"ref_{n}_{c}.npz")
                    if impl != "torch" and ref and os.path.exists(ref):
                        cfg["reference"] = ref
                    cfg_path, res_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "res.json")
                    if os.path.exists(res_path):
                        os.remove(res_path)
                    python = args.torch_python if impl == "torch" else sys.executable
                    extra_env = dict(blas_extra, **({"MLX_DISABLE_COMPILE": "1"} if args.no_compile else {}))
                    env = _worker_env(extra_env if impl != "torch" else {}, args.threads)
                    prefix, perf_data = [], None
                    if args.profile:
                        prefix, extra, perf_data = P.prepare(tmp, f"{impl}_{n}_{c}")
                        cfg.update(extra)
                    with open(cfg_path, "w") as f:
                        json.dump(cfg, f)
                    print(f"[bench] {impl:5s} n={n} C={c} ...", end="", flush=True, file=sys.stderr)
                    try:
                        proc = subprocess.run(prefix + [python, "-m", "bench.worker", cfg_path, res_path], env=env,
                                              cwd=str(E.ROOT), capture_output=True, text=True, timeout=args.timeout)
                        stderr = proc.stderr
                    except subprocess.TimeoutExpired:
                        proc, stderr = None, ""
                    if os.path.exists(res_path):
                        with open(res_path) as f:
                            res = json.load(f)
                    else:
                        why = "timed out" if proc is None else f"exited {proc.returncode}: {stderr.strip()[-300:]}"
                        res = {"impl": impl, "seq_len": n, "chunk": c, "status": "error", "error": f"worker {why}"}
                    doc["results"].append(res)
                    if perf_data and res.get("status") == "ok":
                        res["profile"] = P.summarize(perf_data)
                    if res.get("status") == "ok":
                        print(f" median {res['median_s']:.3f} s, peak RSS +{res['memory']['peak_rss_delta_bytes'] / 2**20:.0f}"
                              f" MiB, BLAS {res['blas']['description']}", file=sys.stderr)
                    else:
                        failed = True
                        print(f" FAILED: {res.get('error')}", file=sys.stderr)
    doc["flops_per_config"] = {f"n{n}_c{c}": neural_memory_flops(n, args.dim, c, args.batch, args.heads)
                               for n in args.seq_lens for c in args.chunk}
    doc["comparisons"] = comparisons(doc["results"])
    doc["form_comparisons"] = form_comparisons(doc["results"])
    paths = write_outputs(doc, out_dir / name, plot_png=not (args.no_plot or args.profile))
    for p in paths:
        print(p)
    print(markdown(doc))
    return 1 if failed else 0


def torch_peak_estimate(n: int, dim: int, chunk: int, batch: int = 1) -> float:
    """titans-pytorch NeuralMemory forward's peak RSS, bytes: ~16 float32 copies of the per-chunk weights
    (n/C chunks of d·4d), fitted to the runs in bench/results (C=64: 9.2 GB at 16K; C=16: 8.8 GB at 4K)."""
    return 16.0 * batch * n * dim * 4 * dim * 4 / chunk


def write_outputs(doc: dict, stem: Path, plot_png: bool = True, md=None, plot_fn=None) -> list[str]:
    md, plot_fn = md or markdown, plot_fn or plot
    paths = []
    with open(f"{stem}.json", "w") as f:
        json.dump(doc, f, indent=1)
    paths.append(f"{stem}.json")
    with open(f"{stem}.md", "w") as f:
        f.write(md(doc))
    paths.append(f"{stem}.md")
    if plot_png:
        if plot_fn(doc, f"{stem}.png"):
            paths.append(f"{stem}.png")
        elif importlib.util.find_spec("matplotlib") is None:
            print("[bench] matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
    return paths


def make_out_dir(args) -> Path:
    """--out, created; a UserError naming it when it cannot be."""
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {out_dir}: {e.strerror}")
    return out_dir


def publish(doc: dict, stem: Path, plot_png: bool, report) -> None:
    """Summarise doc with a report module (summary, markdown, plot), write .json/.md(/.png), print paths and table."""
    doc["summary"] = report.summary(doc)
    for p in write_outputs(doc, stem, plot_png, report.markdown, report.plot):
        print(p)
    print(report.markdown(doc))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["memory", *argv]  # the default workload: `python -m bench --blas openblas`
    args = setup_arg_parser().parse_args(argv)
    try:
        if args.cmd == "memory":
            return run_memory(args, argv)
        if args.cmd == "mac":
            from bench.mac import run_mac
            return run_mac(args, argv, sys.modules[__name__])
        if args.cmd == "train":
            from bench.train import run_train
            return run_train(args, argv, sys.modules[__name__])
        if args.cmd == "serve":
            from bench.serve import run_serve
            return run_serve(args, argv, sys.modules[__name__])
        if args.cmd == "report":
            for path in args.json:
                try:
                    with open(path) as f:
                        doc = json.load(f)
                except (OSError, ValueError) as e:
                    raise UserError(f"report: cannot read {path}: {e}")
                if doc.get("benchmark") == "mac_context_depth":
                    from bench.mac_report import markdown as mmd, plot as mplot, summary
                    doc["summary"] = summary(doc)
                    outs = write_outputs(doc, Path(path).with_suffix(""), True, mmd, mplot)
                elif doc.get("benchmark") == "training_step":
                    from bench.train_report import markdown as tmd, plot as tplot, summary as tsummary
                    doc["summary"] = tsummary(doc)
                    outs = write_outputs(doc, Path(path).with_suffix(""), True, tmd, tplot)
                else:
                    doc["comparisons"] = comparisons(doc["results"])
                    outs = write_outputs(doc, Path(path).with_suffix(""))
                for p in outs:
                    print(p)
            return 0
        if args.cmd == "env":
            print(json.dumps(E.environment(argv), indent=1))
            return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
