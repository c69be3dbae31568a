"""One implementation, one model config, one process: `python -m bench.train_worker CONFIG.json RESULT.json`.

Run by `python -m bench train` (never imported by it), so that every (implementation, config)'s peak memory is its own.
A training step, the same on both sides: next-token cross-entropy forward, backward, AdamW update (same lr, betas, eps,
weight decay; MLX with bias correction, as torch), on the same (batch, seq_len + 1) random token ids every step.
  torch: titans-pytorch MemoryAsContextTransformer in train mode, `model(ids, return_loss=True)`, `loss.backward()`,
         torch.optim.AdamW; `loss.item()` ends the step.
  mlx:   titans_mlx MAC (titans-pytorch's initial weights via Model.sanitize when the torch worker exported them),
         `nn.value_and_grad(model, Model.loss)` + mlx.optimizers.AdamW, compiled as mlx-lm's trainer does
         (`mx.compile(step, inputs=state, outputs=state)`, state = [model.state, optimizer.state, mx.random.state]),
         `mx.eval(state, loss)` after each step.
Protocol: set-up -> gc (+ mx.clear_cache) -> baseline RSS / MLX active memory -> `warmup` steps (compilation; the
first step's loss is the same-computation check) -> reset the RSS high-water mark and MLX's peak -> `repeats` x
`steps` timed steps -> peaks -> (mlx) the lone NeuralMemory store forward+backward probe -> plain matmul FLOP/s.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from bench import env as E
from bench.flops import matmul_flops, memory_forward_flops, memory_mlp_dims, memory_train_flops
from bench.worker import _median, _timeit, finish, serve


def token_ids(cfg):
    import numpy as np

    rng = np.random.default_rng(cfg["seed"])
    return rng.integers(0, cfg["mac_config"]["num_tokens"], (cfg["batch"], cfg["seq_len"] + 1)).astype(np.int64)


def _timed_steps(step, cfg, measure):
    """warm-up, reset peaks, repeats x steps; per-repeat seconds per step (wall and CPU) and every loss."""
    losses = [step() for _ in range(cfg["warmup"])]
    measure["after_warmup"]()
    per_step, per_step_cpu, all_times = [], [], []
    for _ in range(cfg["repeats"]):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(cfg["steps"]):
            t1 = time.perf_counter()
            losses.append(step())
            all_times.append(time.perf_counter() - t1)
        per_step.append((time.perf_counter() - t0) / cfg["steps"])
        per_step_cpu.append((time.process_time() - c0) / cfg["steps"])
    return per_step, per_step_cpu, all_times, losses


# --------------------------------------------------------------------------------------------- torch

def _run_torch(cfg, res, measure):
    import re

    import numpy as np
    import torch

    from bench.mac_worker import _torch_model

    torch.set_num_threads(cfg["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    model = _torch_model(cfg).train()
    ids = torch.from_numpy(token_ids(cfg))
    if cfg.get("export"):  # the initial weights, for the mlx worker
        np.savez(cfg["export"], **{k: v.detach().contiguous().numpy() for k, v in model.state_dict().items()})
    # some multi-head parameters are expanded views (a stride 0) that AdamW's in-place weight decay refuses to write;
    # give them their own storage (same values): torch.optim would fail on them otherwise
    res["torch_params_made_contiguous"] = []
    for pname, p in model.named_parameters():
        if 0 in p.stride() and p.numel() > 1:
            p.data = p.data.clone()
            res["torch_params_made_contiguous"].append(pname)
    params = [p for p in model.parameters() if p.requires_grad]
    res["params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"])
    res["weights"] = "titans-pytorch's (torch.manual_seed)"

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(ids, return_loss=True, disable_flex_attn=True)
        loss.backward()
        opt.step()
        return loss.item()

    measure["setup_done"]()
    timed = _timed_steps(step, cfg, measure)
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    res["backend"] = {"framework": "torch", "device": "cpu", "num_threads": torch.get_num_threads(),
                      "blas_info": blas.group(1) if blas else None,
                      "mode": "eager, train(); model(ids, return_loss=True, disable_flex_attn=True), loss.backward(), "
                              "torch.optim.AdamW.step(), zero_grad(set_to_none=True)"}

    def matmul(size):
        a, b = torch.randn(size, size), torch.randn(size, size)
        return lambda: a @ b
    return timed, matmul, None


# --------------------------------------------------------------------------------------------- mlx

def _mlx_model(cfg):
    import mlx.core as mx
    import numpy as np

    from titans_mlx.mac import Model, ModelArgs

    mx.random.seed(cfg["seed"])
    model = Model(ModelArgs.from_dict(cfg["mac_config"]))
    weights = "random (mx.random.seed)"
    if cfg.get("weights"):
        sd = {k: mx.array(v) for k, v in np.load(cfg["weights"]).items()}
        model.load_weights(list(model.sanitize(sd).items()), strict=True)
        weights = "titans-pytorch's initial weights (Model.sanitize of the torch worker's state dict)"
    model.checkpoint_layers = bool(cfg.get("checkpoint_layers"))
    mx.eval(model.parameters())
    return model, weights


def _run_mlx(cfg, res, measure):
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    model, res["weights"] = _mlx_model(cfg)
    res["params"] = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    ids = mx.array(token_ids(cfg).astype("int32"))
    opt = optim.AdamW(learning_rate=cfg["lr"], betas=list(cfg["betas"]), eps=cfg["eps"],
                      weight_decay=cfg["weight_decay"], bias_correction=True)  # torch's AdamW corrects the bias
    opt.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, lambda m, x: m.loss(x))
    state = [model.state, opt.state, mx.random.state]

    def train_step(x):
        loss, grads = loss_and_grad(model, x)
        opt.update(model, grads)
        return loss

    fn = partial(mx.compile, inputs=state, outputs=state)(train_step) if cfg.get("compile", True) else train_step

    def step():
        loss = fn(ids)
        mx.eval(state, loss)
        return loss.item()

    mx.eval(state)
    measure["setup_done"]()
    timed = _timed_steps(step, cfg, measure)
    res["backend"] = {"framework": "mlx", "device": str(mx.default_device()),
                      "mode": ("mx.compile(step, inputs=state, outputs=state) as mlx-lm's trainer; "
                               if cfg.get("compile", True) else "eager (not compiled); ")
                              + "nn.value_and_grad(model, Model.loss), mlx.optimizers.AdamW(bias_correction=True), "
                              "mx.eval(state, loss) after each step"
                              + ("; model.checkpoint_layers = True" if model.checkpoint_layers else "")}

    def matmul(size):
        a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)
    return timed, matmul, model


def memory_settings(mac: dict, model) -> dict:
    """The MAC's NeuralMemory settings (as titans_mlx.mac.MACLayer builds them), for the lone-memory probe."""
    args = model.args
    spec = dict(args.neural_memory_model) if args.neural_memory_model else None
    kw = dict(args.neural_memory_kwargs)
    heads = kw.get("heads", 1)
    dim_head = kw.get("dim_head") or args.dim
    if spec:
        assert spec.get("class", "MemoryMLP") == "MemoryMLP", "bench: only MemoryMLP memory models"
        dims = memory_mlp_dims(spec["dim"], spec["depth"], spec.get("expansion_factor", 2.0))
    else:
        d = kw.get("default_model_kwargs", {})
        dims = memory_mlp_dims(dim_head, d.get("depth", 2), d.get("expansion_factor", 4.0))
    return {"dim": args.dim, "chunk": args.neural_memory_segment_len, "batch_size": args.neural_memory_batch_size,
            "model": spec, "kwargs": kw, "heads": heads, "dim_head": dim_head, "mlp_dims": dims,
            "spectral_norm": bool(kw.get("spectral_norm_surprises")), "attn_pool": bool(kw.get("attn_pool_chunks")),
            "layer_lr": bool(kw.get("per_parameter_lr_modulation")), "momentum_order": kw.get("momentum_order", 1),
            "layers": len(args.neural_memory_layers)}


def memory_probe(cfg, model) -> dict:
    """A lone NeuralMemory with the MAC's memory settings on (batch, L, dim), L = the positions the MAC's memory
    layers see for seq_len tokens; loss = sum(output * fixed random tensor); compiled forward and forward+backward
    (value_and_grad over its trainable parameters), median of cfg["memory_repeats"] after one warm-up."""
    import mlx.core as mx
    import mlx.nn as nn

    from titans_mlx.memory import NeuralMemory
    from titans_mlx.memory_models import build_memory_model

    s = memory_settings(cfg["mac_config"], model)
    L = model.positions_for(cfg["seq_len"])
    mx.random.seed(cfg["seed"] + 1)
    mem = NeuralMemory(dim=s["dim"], chunk_size=s["chunk"], batch_size=s["batch_size"],
                       model=build_memory_model(dict(s["model"])) if s["model"] else None, **s["kwargs"])
    x = mx.random.normal((cfg["batch"], L, s["dim"]))
    r = mx.random.normal((cfg["batch"], L, s["dim"]))
    mx.eval(mem.parameters(), x, r)
    loss_and_grad = nn.value_and_grad(mem, lambda m, x: mx.sum(m(x)[0] * r))
    state = [mem.state]  # nn.value_and_grad puts its traced parameters into the module: write them back (outputs)
    fwd = mx.compile(lambda x: mx.sum(mem(x)[0] * r), inputs=state, outputs=state)
    fwd_bwd = mx.compile(lambda x: loss_and_grad(mem, x), inputs=state, outputs=state)
    out = {"input_shape": [cfg["batch"], L, s["dim"]], "settings": {k: v for k, v in s.items() if k != "kwargs"},
           "neural_memory_kwargs": s["kwargs"]}
    reps = cfg["memory_repeats"]
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        times, cpu = _timeit(lambda: mx.eval(fn(x)), 1, reps)
        out[f"{name}_s"] = _median(times)
        out[f"{name}_times_s"] = times
        out[f"{name}_cpu_s"] = _median(cpu)
        out[f"{name}_mlx_peak_delta_bytes"] = mx.get_peak_memory() - base
    flop_args = dict(dim_head=s["dim_head"], mlp_dims=s["mlp_dims"], spectral_norm=s["spectral_norm"],
                     attn_pool=s["attn_pool"], layer_lr=s["layer_lr"], momentum_order=s["momentum_order"])
    out["forward_flops"] = memory_forward_flops(L, s["dim"], s["chunk"], cfg["batch"], s["heads"], **flop_args)
    out["forward_backward_flops"] = memory_train_flops(L, s["dim"], s["chunk"], cfg["batch"], s["heads"], **flop_args)
    if s["spectral_norm"]:
        out["newton_schulz_forward_flops"] = out["forward_flops"] - memory_forward_flops(
            L, s["dim"], s["chunk"], cfg["batch"], s["heads"], **dict(flop_args, spectral_norm=False))
    out["forward_flops_per_s"] = out["forward_flops"] / out["forward_s"]
    out["forward_backward_flops_per_s"] = out["forward_backward_flops"] / out["forward_backward_s"]
    return out


# --------------------------------------------------------------------------------------------- main

def run_worker(cfg: dict) -> dict:
    res = {"impl": cfg["impl"], "config": cfg["config_name"], "seq_len": cfg["seq_len"], "batch": cfg["batch"],
           "threads": cfg["threads"], "pid": os.getpid(), "ld_preload": os.environ.get("LD_PRELOAD"),
           "versions": E.versions()}
    try:
        res["loadavg_before"] = list(os.getloadavg())
    except OSError:
        pass
    is_mlx = cfg["impl"] == "mlx"
    mem = {}

    def setup_done():
        if is_mlx:
            import mlx.core as mx
            mx.clear_cache()
            mx.reset_peak_memory()
            mem["mlx_active_setup"] = mx.get_active_memory()
        gc.collect()
        mem["rss_setup"] = E.rss_bytes()
        mem["reset_setup"] = E.reset_peak_rss()

    def after_warmup():
        mem["peak_warmup"] = E.peak_rss_bytes()
        if is_mlx:
            import mlx.core as mx
            mem["mlx_peak_warmup"] = mx.get_peak_memory()
            mx.clear_cache()
            mem["mlx_active_warm"] = mx.get_active_memory()
            mx.reset_peak_memory()
        gc.collect()
        mem["rss_warm"] = E.rss_bytes()
        mem["reset_warm"] = E.reset_peak_rss()

    t0 = time.perf_counter()
    run = _run_mlx if is_mlx else _run_torch
    (per_step, per_step_cpu, all_times, losses), matmul, model = run(
        cfg, res, {"setup_done": setup_done, "after_warmup": after_warmup})
    res["wall_total_s"] = time.perf_counter() - t0
    peak = E.peak_rss_bytes()
    sub = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
    m = {"method": ("VmRSS/VmHWM from /proc/self/status; HWM reset via /proc/self/clear_refs after set-up and again "
                    "after the warm-up steps" if mem.get("reset_warm") else "getrusage ru_maxrss (not resettable)"),
         "rss_after_setup_bytes": mem.get("rss_setup"), "rss_after_warmup_bytes": mem.get("rss_warm"),
         "peak_rss_bytes": peak,
         # the main figure: the timed steps' high-water mark above the set-up process (weights + batch loaded), so it
         # holds the optimizer state, gradients, activations and whatever the allocator keeps between steps
         "peak_rss_delta_bytes": sub(peak, mem.get("rss_setup")),
         # the steps' transient memory alone, above the steady state after warm-up
         "step_rss_delta_bytes": sub(peak, mem.get("rss_warm")),
         "warmup_peak_rss_delta_bytes": sub(mem.get("peak_warmup"), mem.get("rss_setup"))}
    if is_mlx:
        import mlx.core as mx
        m["mlx_active_after_setup_bytes"] = mem["mlx_active_setup"]
        m["mlx_peak_bytes"] = mx.get_peak_memory()
        m["mlx_peak_delta_bytes"] = mx.get_peak_memory() - mem["mlx_active_setup"]
        m["mlx_step_peak_delta_bytes"] = mx.get_peak_memory() - mem["mlx_active_warm"]
        m["mlx_warmup_peak_delta_bytes"] = mem["mlx_peak_warmup"] - mem["mlx_active_setup"]
    res["memory"] = m
    res["losses"] = losses
    res["first_loss"] = losses[0] if losses else None
    res["step_s"] = per_step
    res["step_cpu_s"] = per_step_cpu
    res["step_times_s"] = all_times
    res["median_step_s"] = _median(per_step)
    res["min_step_s"] = min(per_step)
    res["median_step_cpu_s"] = _median(per_step_cpu)
    tokens = cfg["batch"] * cfg["seq_len"]
    res["tokens_per_step"] = tokens
    res["tokens_per_s"] = tokens / res["median_step_s"]
    res["tokens_per_cpu_s"] = tokens / res["median_step_cpu_s"] if res["median_step_cpu_s"] > 0 else None

    if is_mlx and cfg.get("memory_repeats"):
        res["memory_probe"] = memory_probe(cfg, model)
        p = res["memory_probe"]
        # the MAC step holds `layers` such stores (with qkv views / weight residual where configured: an estimate)
        p["est_share_of_step"] = p["settings"]["layers"] * p["forward_backward_s"] / res["median_step_s"]
    size = cfg["matmul_size"]
    if size:
        mm_times, _ = _timeit(matmul(size), 1, cfg["matmul_repeats"])
        res["matmul"] = {"size": size, "dtype": "float32", "times_s": mm_times, "median_s": _median(mm_times),
                         "flops_per_s": matmul_flops(size) / _median(mm_times)}
        if res.get("memory_probe"):
            p = res["memory_probe"]
            p["efficiency_forward_backward"] = p["forward_backward_flops_per_s"] / res["matmul"]["flops_per_s"]
            p["efficiency_forward"] = p["forward_flops_per_s"] / res["matmul"]["flops_per_s"]
    return finish(res, res["backend"].get("blas_info"))


def main(argv=None):
    return serve(run_worker, ("impl", "config_name"), argv)


if __name__ == "__main__":
    sys.exit(main())
