"""Summary (targets: >= 3x titans-pytorch's tokens/s at <= 1/4 of its peak memory), markdown table and PNG plot of
`python -m bench train`."""

from __future__ import annotations

from bench import env as E
from bench.report import pyplot

NAMES = {"torch": "titans-pytorch", "mlx": "titans_mlx"}
SPEED_TARGET, MEMORY_TARGET = 3.0, 0.25


def _ok(doc):
    by = {}
    for r in doc["results"]:
        if r.get("status") == "ok":
            by.setdefault(r["config"], {})[r["impl"]] = r
    return by


def summary(doc: dict) -> dict:
    """Per config with both implementations: tokens/s ratio, peak-memory ratios, first-loss difference, targets."""
    out = {}
    for name, d in _ok(doc).items():
        if "torch" not in d or "mlx" not in d:
            continue
        t, m = d["torch"], d["mlx"]
        tm, mm = t["memory"], m["memory"]
        speed = m["tokens_per_s"] / t["tokens_per_s"]
        cpu = (m["tokens_per_cpu_s"] / t["tokens_per_cpu_s"]) if m.get("tokens_per_cpu_s") and t.get(
            "tokens_per_cpu_s") else None
        mem = mm["peak_rss_delta_bytes"] / tm["peak_rss_delta_bytes"] if tm.get("peak_rss_delta_bytes") else None
        mlx_mem = mm["mlx_peak_delta_bytes"] / tm["peak_rss_delta_bytes"] if tm.get("peak_rss_delta_bytes") else None
        a, b = t.get("first_loss"), m.get("first_loss")
        out[name] = {"speedup": speed, "cpu_time_speedup": cpu, "peak_rss_ratio": mem,
                     "mlx_peak_over_torch_rss": mlx_mem, "speed_target_met": speed >= SPEED_TARGET,
                     "memory_target_met": mem is not None and mem <= MEMORY_TARGET,
                     "first_loss_torch": a, "first_loss_mlx": b,
                     "first_loss_rel_diff": abs(a - b) / abs(a) if a and b is not None else None,
                     "same_weights": "titans-pytorch" in (m.get("weights") or "")}
    return out


def _mb(x):
    return "—" if x is None else f"{x / 2**20:,.0f}"


def _x(v, fmt="{:.2f}×"):
    return "—" if v is None else fmt.format(v)


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    opt = cfg["optimizer"]
    L = [f"# MAC training step: titans_mlx vs titans-pytorch ({doc['name']})", "",
         f"One step = next-token cross-entropy forward, backward, AdamW (lr {opt['lr']:g}, betas {opt['betas']}, eps "
         f"{opt['eps']:g}, weight decay {opt['weight_decay']:g}) on a fixed random batch of {cfg['batch']} × "
         f"{cfg['seq_len']} tokens (+1 for the targets); {cfg['warmup']} warm-up step(s), then {cfg['repeats']} "
         f"repeats of {cfg['steps']} timed step(s), median per-step time; {cfg['threads']} thread(s). titans_mlx: "
         + ("`mx.compile`d step as mlx-lm's trainer" if cfg.get("compile", True) else "eager step")
         + (", per-layer `mx.checkpoint`" if cfg.get("checkpoint_layers") else "")
         + ", on titans-pytorch's initial weights when both ran. Peak RSS Δ = the timed steps' RSS high-water mark "
           "above the worker after set-up (weights and batch loaded): optimizer state, gradients, activations and what "
           "the allocator keeps; step Δ = the same above the steady state after warm-up. MLX peak Δ = "
           "`mx.get_peak_memory()` over the timed steps above the active memory after set-up. (torch has no CPU "
           "allocator peak counter; its RSS is the measure for both.)", "",
         "| config | impl | BLAS | s/step | CPU s/step | tok/s | peak RSS Δ MiB | step Δ MiB | MLX peak Δ MiB "
         "| first loss | load |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        name = NAMES.get(r.get("impl"), r.get("impl"))
        if r.get("status") != "ok":
            L.append(f"| {r.get('config')} | {name} | — | failed: {str(r.get('error', '?'))[:90]} | | | | | | | |")
            continue
        m = r["memory"]
        L.append(f"| {r['config']} | {name} | {r['blas']['description'].split(' (')[0]} | {r['median_step_s']:.3f} "
                 f"| {r['median_step_cpu_s']:.3f} | {r['tokens_per_s']:,.0f} | {_mb(m['peak_rss_delta_bytes'])} "
                 f"| {_mb(m.get('step_rss_delta_bytes'))} | {_mb(m.get('mlx_peak_delta_bytes'))} "
                 f"| {r['first_loss']:.6f} | {', '.join(f'{x:.1f}' for x in r.get('loadavg_before', []))} |")
    s = doc.get("summary") or {}
    if s:
        L += ["", f"Targets: ≥ {SPEED_TARGET:g}× titans-pytorch's tokens/s at ≤ {MEMORY_TARGET:g} of its peak memory "
              "(peak RSS Δ, same method both sides).", "",
              "| config | tok/s mlx / torch | per CPU-s | peak RSS mlx / torch | MLX peak / torch RSS | speed | memory "
              "| first loss rel. diff |", "|---|---:|---:|---:|---:|---|---|---:|"]
        for name, v in s.items():
            L.append(f"| {name} | {_x(v['speedup'])} | {_x(v['cpu_time_speedup'])} "
                     f"| {_x(v['peak_rss_ratio'], '{:.3f}')} | {_x(v['mlx_peak_over_torch_rss'], '{:.3f}')} "
                     f"| {'met' if v['speed_target_met'] else 'missed'} "
                     f"| {'met' if v['memory_target_met'] else 'missed'} | {_x(v['first_loss_rel_diff'], '{:.1e}')}"
                     f"{'' if v['same_weights'] else ' (different weights)'} |")
    probes = [r for r in doc["results"] if r.get("status") == "ok" and r.get("memory_probe")]
    if probes:
        L += ["", "Lone NeuralMemory store+retrieve with each config's memory settings (titans_mlx, compiled), input "
              "(batch, L, dim) with L = the positions a MAC memory layer sees; loss = sum(output × fixed random); "
              "FLOPs analytic (bench/flops.py TRAIN_FLOPS_DOC: forward counted, forward+backward = 3× forward); "
              "efficiency = its FLOP/s over the same worker's plain float32 matmul FLOP/s. Share of step = memory "
              "layers × forward+backward time / the MAC step time (an estimate: the MAC's memories also take qkv views "
              "and weight residuals where configured).", "",
              "| config | input | fwd s | fwd+bwd s | fwd+bwd GFLOP | GFLOP/s | matmul GFLOP/s | efficiency "
              "| Newton–Schulz share of FLOPs | share of step | fwd+bwd MLX peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in probes:
            p = r["memory_probe"]
            mm = (r.get("matmul") or {}).get("flops_per_s")
            ns = p.get("newton_schulz_forward_flops")
            ns = "—" if ns is None else f"{ns / p['forward_flops']:.0%}"
            L.append(f"| {r['config']} | {tuple(p['input_shape'])} | {p['forward_s']:.3f} "
                     f"| {p['forward_backward_s']:.3f} "
                     f"| {p['forward_backward_flops'] / 1e9:.2f} | {p['forward_backward_flops_per_s'] / 1e9:.1f} "
                     f"| {'—' if mm is None else f'{mm / 1e9:.1f}'} "
                     f"| {_x(p.get('efficiency_forward_backward'), '{:.0%}')} "
                     f"| {ns} "
                     f"| {_x(p.get('est_share_of_step'), '{:.0%}')} "
                     f"| {_mb(p.get('forward_backward_mlx_peak_delta_bytes'))} |")
    L += ["", "Configs:", ""]
    for name, mac in cfg["configs"].items():
        params = {r["impl"]: r.get("params") for r in doc["results"] if r.get("config") == name and r.get("params")}
        L.append(f"- {name} (trainable parameters {', '.join(f'{NAMES[k]} {v:,}' for k, v in params.items())}): "
                 f"`{mac}`")
    L += E.environment_lines(doc, NAMES)
    return "\n".join(L)


def plot(doc: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    by = _ok(doc)
    if not by:
        return False
    names = list(by)
    impls = [i for i in ("torch", "mlx") if any(i in d for d in by.values())]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(names))]
        tps = [by[n][impl]["tokens_per_s"] if impl in by[n] else 0 for n in names]
        mem = [(by[n][impl]["memory"]["peak_rss_delta_bytes"] or 0) / 2**20 if impl in by[n] else 0 for n in names]
        b0 = axes[0].bar(xs, tps, width, label=NAMES[impl])
        b1 = axes[1].bar(xs, mem, width, label=NAMES[impl] + " (peak RSS Δ)")
        axes[0].bar_label(b0, fmt="%.0f", fontsize=8)
        axes[1].bar_label(b1, fmt="%.0f", fontsize=8)
        if impl == "mlx":
            axes[1].scatter(xs, [(by[n]["mlx"]["memory"]["mlx_peak_delta_bytes"]) / 2**20 if "mlx" in by[n] else 0
                                 for n in names], marker="_", s=400, color="k", zorder=3,
                            label="titans_mlx mx.get_peak_memory() Δ")
    s = doc.get("summary") or {}
    labels = [n + (f"\n{s[n]['speedup']:.2f}×, mem {s[n]['peak_rss_ratio']:.2f}" if n in s else "") for n in names]
    for ax, title in zip(axes, ("training tokens/s (median step)", "peak memory above set-up (MiB)")):
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    cfg = doc["config"]
    blas = sorted({r["blas"]["description"].split(" (")[0] for r in doc["results"]
                   if r.get("status") == "ok" and r["impl"] == "mlx"})
    fig.suptitle(f"MAC training step (fwd + bwd + AdamW), batch {cfg['batch']} × {cfg['seq_len']} tokens, "
                 f"{cfg['threads']} thread(s), MLX BLAS {', '.join(blas)} — {doc['environment']['cpu']}; "
                 f"targets ≥ {SPEED_TARGET:g}×, ≤ {MEMORY_TARGET:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
