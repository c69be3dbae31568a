"""One model, one context depth, one process: `python -m bench.mac_worker CONFIG.json RESULT.json`.

Run by `python -m bench mac` (never imported by it), so that every depth's peak memory is its own.
Protocol, the same for every implementation:
  set-up (model, weights, random prompt) -> warm-up (a short prefill + decode on a throw-away cache, so JIT
  compilation is not timed) -> gc, clear MLX's buffer cache -> baseline RSS, reset RSS high-water mark and MLX peak
  -> prefill `depth` tokens (timed; per-block times) -> peak after prefill -> decode `tg` tokens greedily (timed)
  -> peaks -> plain matmul FLOP/s -> BLAS libraries mapped.
impl: "mlx" (titans_mlx MAC through titans_mlx.generate.generate_step: prefill in segment-aligned blocks with
mx.eval + mx.clear_cache between, mlx-lm style pipelined decode), "llama" (mlx-lm's llama with its KV cache, the
same generate_step), "torch" (titans-pytorch MemoryAsContextTransformer: its parallel forward on the prompt, then its
cached one-token forwards as in its sample(use_cache=True), greedy).
"""

from __future__ import annotations

import gc
import os
import sys
import time

from bench import env as E
from bench.flops import matmul_flops
from bench.worker import _median, _timeit, finish, serve


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    w, c = _clock()
    return w - t[0], c - t[1]


# --------------------------------------------------------------------------------------------- mlx (MAC, llama)

def _mlx_model(cfg):
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    mx.random.seed(cfg["seed"])
    if cfg["impl"] == "llama":
        from mlx_lm.models import llama

        model = llama.Model(llama.ModelArgs.from_dict(cfg["llama_config"]))
        weights = "random (mx.random.seed)"
    else:
        from titans_mlx.mac import Model, ModelArgs

        model = Model(ModelArgs.from_dict(cfg["mac_config"]))
        weights = "random (mx.random.seed)"
        if cfg.get("weights"):
            sd = {k: mx.array(v) for k, v in np.load(cfg["weights"]).items()}
            model.load_weights(list(model.sanitize(sd).items()), strict=True)
            weights = "titans-pytorch's (same weights as the torch worker)"
        model.compile_decode = cfg.get("compile_decode", True)
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return model, weights, params


def _primitives_per_token(model, state, token, n):
    """MLX primitives in the graph of each of the next n decoded tokens (a copy of the cache; a whole window, so
    chunk-boundary and segment-boundary tokens are in): {mean, min, max}. A compiled function counts as what it
    compiles to (each fused element-wise group one): about what the token dispatches."""
    import copy
    import io

    import mlx.core as mx

    cache, counts = copy.deepcopy(state.cache), []
    for _ in range(n):
        logits = model(mx.array([[token]]), cache=cache)
        dot = io.StringIO()
        arrays = [a for c in cache for a in _arrays(c.state)]
        mx.export_to_dot(dot, logits, *arrays)
        counts.append(dot.getvalue().count("shape=rectangle"))
        mx.eval(logits, arrays)
        token = int(mx.argmax(logits[0, -1]).item())
    return {"mean": sum(counts) / n, "min": min(counts), "max": max(counts), "tokens": n}


def _arrays(tree):
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    return [tree] if hasattr(tree, "nbytes") and hasattr(tree, "dtype") else []


def _run_mlx(cfg, res, prompt, measure):
    import mlx.core as mx
    from titans_mlx.generate import GenerationState, generate_step

    model, res["weights"], res["params"] = _mlx_model(cfg)
    step = cfg["prefill_step"]

    def session(tokens, tg, marks=None):
        state = GenerationState.new(model)
        cb = (lambda done, total: marks.append((done, *_clock()))) if marks is not None else None
        for _ in generate_step(tokens, model, max_tokens=0, state=state, prefill_step_size=step,
                               prompt_progress_callback=cb):
            pass
        return state

    def decode(state, tg):
        out = []
        for tok, _ in generate_step([], model, max_tokens=tg, state=state):
            out.append(tok)
        return out

    warm = session(prompt[: min(len(prompt), 2 * step + 5)], 0)  # compiles every kernel shape used below
    decode(warm, 4)
    del warm
    measure["reset"]()
    mx.reset_peak_memory()
    base_active = mx.get_active_memory()

    marks = []
    t = _clock()
    state = session(prompt, 0, marks)
    res["prefill_s"], res["prefill_cpu_s"] = _since(t)
    res["peak_after_prefill"] = measure["peak"]()
    res["mlx_peak_after_prefill_delta_bytes"] = mx.get_peak_memory() - base_active
    res["blocks"] = [{"tokens_done": d, "t_s": w - t[0]} for d, w, _ in marks]
    res["cache_bytes_after_prefill"] = sum(int(c.nbytes) for c in state.cache)
    res["last_logits"] = [float(v) for v in state.logits.reshape(-1).tolist()]

    t = _clock()
    tokens = decode(state, cfg["tg"])
    res["decode_s"], res["decode_cpu_s"] = _since(t)
    res["generated"] = tokens[:16]
    res["primitives_per_token"] = _primitives_per_token(model, state, tokens[-1], getattr(model, "window", 32))
    res["mlx_peak_delta_bytes"] = mx.get_peak_memory() - base_active
    res["mlx_active_after_bytes"] = mx.get_active_memory() - base_active
    res["backend"] = {"framework": "mlx", "device": str(mx.default_device()),
                      "mode": f"titans_mlx.generate.generate_step, prefill_step_size={step}"}

    def matmul(size):
        a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)
    return matmul


# --------------------------------------------------------------------------------------------- torch (MAC)

def _torch_model(cfg):
    import torch
    from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

    torch.manual_seed(cfg["seed"])
    kw = dict(cfg["mac_config"])
    kw.pop("model_type", None)
    spec = kw.pop("neural_memory_model", None)
    if spec:
        spec = dict(spec)
        assert spec.pop("class") == "MemoryMLP", "bench: only MemoryMLP memory models"
        kw["neural_memory_model"] = MemoryMLP(**spec)
    if "neural_memory_layers" in kw:
        kw["neural_memory_layers"] = tuple(kw["neural_memory_layers"])
    return MemoryAsContextTransformer(**kw).eval()


def _export_torch(cfg):
    import numpy as np

    model = _torch_model(cfg)
    np.savez(cfg["export"], **{k: v.detach().contiguous().numpy() for k, v in model.state_dict().items()})


def _run_torch(cfg, res, prompt, measure):
    import torch

    torch.set_num_threads(cfg["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    model = _torch_model(cfg)
    res["weights"] = "titans-pytorch's (torch.manual_seed)"
    res["params"] = sum(p.numel() for p in model.parameters())

    @torch.no_grad()
    def run(tokens, tg):
        # titans-pytorch's sample(use_cache=True) loop, greedy; returns (prefill time, logits, decode time, tokens)
        pos = model.axial_pos_emb(model.axial_pos_emb.maybe_derive_outer_dim(
            model.seq_len_with_longterm_mem(len(tokens) + tg), (model.neural_memory_segment_len,)),
            return_factorized=True)
        out = torch.tensor([tokens], dtype=torch.long)
        t = _clock()
        logits, cache = model(out, disable_flex_attn=True, return_cache=True, factorized_pos_emb=pos)
        prefill = _since(t)
        first = logits[0, -1].clone()
        t = _clock()
        while out.shape[-1] < len(tokens) + tg:
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat((out, nxt), dim=-1)
            logits = None
            while logits is None:
                logits, cache = model(out, disable_flex_attn=True, cache=cache, return_cache=True,
                                      factorized_pos_emb=pos)
        return prefill, first, _since(t), out[0, len(tokens):].tolist()

    run(prompt[: min(len(prompt), 100)], 4)
    measure["reset"]()
    (res["prefill_s"], res["prefill_cpu_s"]), first, (res["decode_s"], res["decode_cpu_s"]), toks = run(prompt, cfg["tg"])
    res["peak_after_prefill"] = None  # one forward does both; the peak below covers prefill and decode
    res["last_logits"] = first.tolist()
    res["generated"] = toks[:16]
    import re

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    res["backend"] = {"framework": "torch", "device": "cpu", "num_threads": torch.get_num_threads(),
                      "blas_info": blas.group(1) if blas else None,
                      "mode": "torch.no_grad(); parallel forward on the prompt, then cached one-position forwards "
                              "(sample(use_cache=True) loop, greedy)"}

    def matmul(size):
        a, b = torch.randn(size, size), torch.randn(size, size)
        return lambda: a @ b
    return matmul


# --------------------------------------------------------------------------------------------- main

def run_worker(cfg: dict) -> dict:
    if cfg.get("export"):
        _export_torch(cfg)
        return {"status": "ok", "exported": cfg["export"]}
    import random

    res = {"impl": cfg["impl"], "depth": cfg["depth"], "tg": cfg["tg"], "threads": cfg["threads"],
           "pid": os.getpid(), "ld_preload": os.environ.get("LD_PRELOAD"), "versions": E.versions()}
    try:
        res["loadavg_before"] = list(os.getloadavg())
    except OSError:
        pass
    rng = random.Random(cfg["seed"])
    prompt = [rng.randrange(cfg["vocab"]) for _ in range(cfg["depth"])]
    state = {}

    def reset():
        if cfg["impl"] != "torch":
            import mlx.core as mx
            mx.clear_cache()
        gc.collect()
        state["base"] = E.rss_bytes()
        state["reset_ok"] = E.reset_peak_rss()

    def peak():
        p = E.peak_rss_bytes()
        return p - state["base"] if state.get("base") is not None else None

    t0 = time.perf_counter()
    matmul = (_run_torch if cfg["impl"] == "torch" else _run_mlx)(cfg, res, prompt, {"reset": reset, "peak": peak})
    res["wall_total_s"] = time.perf_counter() - t0
    res["memory"] = {"method": "VmRSS/VmHWM from /proc/self/status, HWM reset via /proc/self/clear_refs after "
                               "set-up and warm-up" if state.get("reset_ok") else "getrusage ru_maxrss",
                     "baseline_rss_bytes": state.get("base"), "peak_rss_delta_bytes": peak(),
                     "peak_rss_delta_after_prefill_bytes": res.pop("peak_after_prefill")}
    d, tg = cfg["depth"], cfg["tg"]
    res["prefill_tokens_per_s"] = d / res["prefill_s"]
    res["decode_tokens_per_s"] = tg / res["decode_s"] if tg else None
    res["decode_tokens_per_cpu_s"] = tg / res["decode_cpu_s"] if tg and res["decode_cpu_s"] > 0 else None
    blocks = res.get("blocks") or []
    full = [(a, b) for a, b in zip(blocks, blocks[1:]) if b["tokens_done"] - a["tokens_done"] == cfg["prefill_step"]]
    if full:  # the last full block of the prefill: llama-bench's pp<block> @ d<depth before it>
        a, b = full[-1]
        res["last_block"] = {"tokens": cfg["prefill_step"], "at_depth": a["tokens_done"],
                             "tokens_per_s": cfg["prefill_step"] / (b["t_s"] - a["t_s"])}

    size = cfg["matmul_size"]
    if size:
        mm_times, _ = _timeit(matmul(size), 1, 3)
        res["matmul"] = {"size": size, "dtype": "float32", "median_s": _median(mm_times),
                         "flops_per_s": matmul_flops(size) / _median(mm_times)}
    return finish(res, res["backend"].get("blas_info"))


def main(argv=None):
    return serve(run_worker, ("impl", "depth"), argv)


if __name__ == "__main__":
    sys.exit(main())
