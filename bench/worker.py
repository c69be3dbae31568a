"""One implementation, one configuration, one process: `python -m bench.worker CONFIG.json RESULT.json`.

Run by `python -m bench` (never imported by it), so that each implementation's peak memory is its own.
Protocol, identical for both implementations:
  set-up (model, input, weights) -> gc -> baseline RSS, reset RSS high-water mark (and MLX peak)
  -> warm-up runs -> timed runs (time.perf_counter around one full forward, results forced) ->
  peak RSS - baseline -> plain matmul FLOP/s on the same backend -> BLAS libraries mapped in this process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

from bench import env as E
from bench.flops import matmul_flops, neural_memory_flops


def _median(xs):
    s = sorted(xs)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


def _timeit(fn, warmup, repeats, after_warmup=None, perf=None):
    for _ in range(warmup):
        fn()
    if after_warmup:
        after_warmup()
    if perf:
        _perf_ctl(perf, "enable")
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if perf:
        _perf_ctl(perf, "disable")
    return times, cpu


def _perf_ctl(perf, cmd):
    """Switch `perf record --control fifo:CTL,ACK` sampling on/off (only the timed runs are sampled)."""
    with open(perf[0], "w") as ctl:
        ctl.write(cmd + "\n")
    with open(perf[1]) as ack:
        ack.readline()


# --------------------------------------------------------------------------------------------- torch

def _setup_torch(cfg):
    import torch

    torch.set_num_threads(cfg["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from titans_pytorch import NeuralMemory

    torch.manual_seed(cfg["seed"])
    mem = NeuralMemory(dim=cfg["dim"], chunk_size=cfg["chunk"], heads=cfg["heads"]).eval()
    x = torch.randn(cfg["batch"], cfg["seq_len"], cfg["dim"])
    out = {}

    def run():
        with torch.no_grad():
            y, state = mem(x)
        out["y"] = y
        return y, state

    def matmul(size):
        a, b = torch.randn(size, size), torch.randn(size, size)

        def mm():
            a @ b
        return mm

    def export(path):
        import numpy as np
        arrays = {"x": x.numpy(), "y": out["y"].numpy()}
        for k, v in mem.state_dict().items():
            arrays["sd/" + k] = v.detach().cpu().contiguous().numpy()
        np.savez(path, **arrays)

    import re as _re
    config = torch.__config__.show()
    m = _re.search(r"BLAS_INFO=(\w+)", config)
    blas_info = m.group(1) if m else None
    m = _re.search(r"^\s*- (.*Math Kernel Library Version[^\n]*)", config, _re.M)
    cap = _re.search(r"CPU capability usage: (\w+)", config)
    backend = {"framework": "torch", "device": "cpu", "num_threads": torch.get_num_threads(),
               "blas_build": m.group(1).strip() if m else None, "cpu_capability": cap.group(1) if cap else None,
               "num_interop_threads": torch.get_num_interop_threads(), "blas_info": blas_info,
               "mode": "torch.no_grad(), eval()"}
    return run, matmul, export, backend, None


# --------------------------------------------------------------------------------------------- mlx

def _collect_arrays(obj, mx, out):
    if isinstance(obj, mx.array):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_arrays(v, mx, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_arrays(v, mx, out)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            _collect_arrays(v, mx, out)
    return out


def _setup_mlx(cfg):
    import mlx.core as mx
    from titans_mlx.memory import NeuralMemory

    if cfg["impl"] == "mlx-loop":  # the store's recurrences chunk by chunk, never in the dual form
        import titans_mlx.memory_step as memory_step
        memory_step.DUAL_FORM = False
    mx.random.seed(cfg["seed"])
    mem = NeuralMemory(dim=cfg["dim"], chunk_size=cfg["chunk"], heads=cfg["heads"])
    ref = None
    weights = "random (mx.random.seed)"
    if cfg.get("reference"):
        import numpy as np
        ref = dict(np.load(cfg["reference"]))
        sd = {k[3:]: mx.array(v) for k, v in ref.items() if k.startswith("sd/")}
        try:
            mem.load_weights(list(mem.sanitize(sd).items()), strict=True)
            x = mx.array(ref["x"])
            weights = "titans-pytorch's (same weights and input as the torch worker)"
        except Exception as e:  # keep benchmarking with random weights, say why
            ref = None
            weights = f"random: loading the torch weights failed: {type(e).__name__}: {e}"
    if ref is None:
        x = mx.random.normal((cfg["batch"], cfg["seq_len"], cfg["dim"]))
    mx.eval(mem.parameters(), x)
    out = {}

    def run():
        # the forward never evaluates by itself: feed one processing block at a time and evaluate between them,
        # so peak memory stays at one block's graph (as generate's prefill does)
        piece, ys, state = mem.block_tokens(x.shape[0]), [], None
        for i in range(0, x.shape[1], piece):
            y, state = mem(x[:, i:i + piece], state=state)
            mx.eval(_collect_arrays((y, state), mx, []))  # everything returned is computed, as in torch
            ys.append(y)
        y = mx.concatenate(ys, axis=1)
        out["y"] = y
        return y, state

    def matmul(size):
        a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
        mx.eval(a, b)

        def mm():
            mx.eval(a @ b)
        return mm

    def check():
        if ref is None:
            return {"weights": weights}
        import numpy as np
        y = np.array(out["y"]).astype(np.float64)
        yr = ref["y"].astype(np.float64)
        err = np.abs(y - yr)
        return {"weights": weights, "max_abs_diff_vs_torch": float(err.max()),
                "max_rel_diff_vs_torch": float(err.max() / max(np.abs(yr).max(), 1e-30))}

    backend = {"framework": "mlx", "device": str(mx.default_device()),
               "mode": "fed one processing block per call, mx.eval after each"}
    try:
        backend["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:
        pass
    try:
        backend["metal_available"] = bool(mx.metal.is_available())
    except Exception:
        pass
    return run, matmul, None, backend, check


# --------------------------------------------------------------------------------------------- main

def run_worker(cfg: dict) -> dict:
    res = {"impl": cfg["impl"], "seq_len": cfg["seq_len"], "chunk": cfg["chunk"], "dim": cfg["dim"],
           "batch": cfg["batch"], "heads": cfg["heads"], "threads": cfg["threads"], "pid": os.getpid(),
           "ld_preload": os.environ.get("LD_PRELOAD"), "versions": E.versions()}
    try:
        res["loadavg_before"] = list(os.getloadavg())
    except OSError:
        pass
    setup = _setup_torch if cfg["impl"] == "torch" else _setup_mlx
    t0 = time.perf_counter()
    run, matmul, export, backend, check = setup(cfg)
    res["backend"] = backend
    res["setup_s"] = time.perf_counter() - t0

    is_mlx = cfg["impl"] != "torch"
    if is_mlx:
        import mlx.core as mx
        mx.clear_cache()
    gc.collect()
    base_rss = E.rss_bytes()
    reset_ok = E.reset_peak_rss()
    if is_mlx:
        mx.reset_peak_memory()
        mlx_active_base = mx.get_active_memory()
    first_peak = {}

    def after_warmup():
        first_peak["rss"] = E.peak_rss_bytes()

    perf = (cfg["perf_ctl"], cfg["perf_ack"]) if cfg.get("perf_ctl") else None
    times, cpu = _timeit(run, cfg["warmup"], cfg["repeats"], after_warmup if cfg["warmup"] else None, perf)
    peak = E.peak_rss_bytes()
    mem = {"method": "VmRSS/VmHWM from /proc/self/status, HWM reset via /proc/self/clear_refs after set-up"
                     if reset_ok else "getrusage ru_maxrss (not resettable: includes set-up)",
           "baseline_rss_bytes": base_rss, "peak_rss_bytes": peak,
           "peak_rss_delta_bytes": (peak - base_rss) if base_rss is not None else None}
    if "rss" in first_peak and base_rss is not None:
        mem["warmup_peak_rss_delta_bytes"] = first_peak["rss"] - base_rss
    if is_mlx:
        mem["mlx_active_baseline_bytes"] = mlx_active_base
        mem["mlx_peak_bytes"] = mx.get_peak_memory()
        mem["mlx_peak_delta_bytes"] = mx.get_peak_memory() - mlx_active_base
        mem["mlx_cache_bytes_after"] = mx.get_cache_memory()
    res["memory"] = mem
    res["times_s"] = times
    med = _median(times)
    res["median_s"] = med
    res["min_s"] = min(times)
    # CPU time of the whole process (all threads): less sensitive than wall time to other load on a shared machine
    res["cpu_times_s"] = cpu
    res["median_cpu_s"] = _median(cpu)
    res["tokens_per_s"] = cfg["batch"] * cfg["seq_len"] / med
    fl = neural_memory_flops(cfg["seq_len"], cfg["dim"], cfg["chunk"], cfg["batch"], cfg["heads"])
    res["flops"] = fl
    res["achieved_flops_per_s"] = fl / med

    if check:
        res["check"] = check()
    if export and cfg.get("export"):
        export(cfg["export"])

    size = cfg["matmul_size"]
    if size:
        mm_times, _ = _timeit(matmul(size), 1, cfg["matmul_repeats"])
        mm_med = _median(mm_times)
        res["matmul"] = {"size": size, "dtype": "float32", "times_s": mm_times, "median_s": mm_med,
                         "flops_per_s": matmul_flops(size) / mm_med}
        res["efficiency"] = res["achieved_flops_per_s"] / res["matmul"]["flops_per_s"]

    return finish(res, backend.get("blas_info"))


def finish(res: dict, torch_blas_info: str | None) -> dict:
    """Close a successful run's record: the BLAS this process actually mapped, and the load it ended under."""
    libs = E.mapped_blas_libraries()
    res["blas"] = {"mapped_libraries": libs,
                   "description": E.describe_blas(libs, torch_blas_info),
                   "openblas_config": E.openblas_config(libs or [])}
    try:
        res["loadavg_after"] = list(os.getloadavg())
    except OSError:
        pass
    res["status"] = "ok"
    return res


def serve(run, id_keys, argv=None) -> int:
    """A worker process: `CONFIG.json OUT.json` -> run(config) -> OUT.json; a failure is recorded, not raised."""
    cfg_path, out_path = sys.argv[1:] if argv is None else argv
    with open(cfg_path) as f:
        cfg = json.load(f)
    try:
        res = run(cfg)
    except Exception as e:
        res = {**{k: cfg.get(k) for k in id_keys}, "status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    return 0 if res["status"] == "ok" else 1


def main(argv=None):
    return serve(run_worker, ("impl", "seq_len", "chunk"), argv)


if __name__ == "__main__":
    sys.exit(main())
