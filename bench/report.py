"""Markdown table and (optional, matplotlib) PNG plots from a benchmark JSON."""

from __future__ import annotations

IMPL_NAMES = {"torch": "titans-pytorch", "mlx": "titans_mlx", "mlx-loop": "titans_mlx (loop form)"}


def _mb(x):
    return "—" if x is None else f"{x / 2**20:,.0f}"


def _g(x):
    return "—" if x is None else f"{x / 1e9:.1f}"


def _ok_by_config(results: list[dict]) -> list:
    """The successful results as sorted ((seq_len, chunk), {impl: result}) pairs."""
    by = {}
    for r in results:
        if r.get("status") == "ok":
            by.setdefault((r["seq_len"], r["chunk"]), {})[r["impl"]] = r
    return sorted(by.items())


def comparisons(results: list[dict]) -> list[dict]:
    """Pair torch and mlx results of the same (seq_len, chunk)."""
    out = []
    for (n, c), d in _ok_by_config(results):
        if "torch" in d and "mlx" in d:
            t, m = d["torch"], d["mlx"]
            tp, mp = t["memory"]["peak_rss_delta_bytes"], m["memory"]["peak_rss_delta_bytes"]
            speedup = t["median_s"] / m["median_s"]
            cpu_speedup = (t["median_cpu_s"] / m["median_cpu_s"]) if m.get("median_cpu_s") else None
            mem_ratio = mp / tp if (tp and mp is not None) else None
            out.append({"seq_len": n, "chunk": c, "torch_median_s": t["median_s"], "mlx_median_s": m["median_s"],
                        "speedup_mlx_over_torch": speedup,
                        "cpu_time_speedup_mlx_over_torch": cpu_speedup, "torch_peak_rss_delta_bytes": tp,
                        "mlx_peak_rss_delta_bytes": mp, "mlx_over_torch_peak_memory": mem_ratio,
                        "target_met": bool(speedup > 1 and mem_ratio is not None and mem_ratio <= 0.25)})
    return out


def form_comparisons(results: list[dict]) -> list[dict]:
    """Pair titans_mlx as it runs (dual form where it applies) with its loop form, per (seq_len, chunk)."""
    return [{"seq_len": n, "chunk": c, "speedup_over_loop": d["mlx-loop"]["median_s"] / d["mlx"]["median_s"]}
            for (n, c), d in _ok_by_config(results) if "mlx" in d and "mlx-loop" in d]


def markdown(doc: dict) -> str:
    env, cfg = doc["environment"], doc["config"]
    lines = [f"# NeuralMemory store+retrieve: titans_mlx vs titans-pytorch ({doc.get('name', '')})", ""]
    lines.append(f"`NeuralMemory(dim={cfg['dim']}, chunk_size=C, heads={cfg['heads']})`, input "
                 f"(batch={cfg['batch']}, n, {cfg['dim']}), default memory model; median of {cfg['repeats']} "
                 f"timed runs after {cfg['warmup']} warm-up; {cfg['threads']} thread(s). "
                 "CPU s = median process CPU time (user+sys, all threads) per run. Peak memory = peak RSS of the worker process above its post-set-up baseline.")
    lines.append("")
    lines.append("| impl | n | C | BLAS | median s | min s | CPU s | tok/s | peak RSS Δ MB | MLX peak Δ MB "
                 "| GFLOP/s | matmul GFLOP/s | efficiency |")
    lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in doc["results"]:
        name = IMPL_NAMES.get(r.get("impl"), r.get("impl"))
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('seq_len')} | {r.get('chunk')} | — | "
                         f"{'' if r.get('status') == 'skipped' else 'failed: '}"
                         f"{r.get('error', '?')[:80]} | | | | | | | | |")
            continue
        mm = r.get("matmul") or {}
        eff = r.get("efficiency")
        lines.append(
            f"| {name} | {r['seq_len']} | {r['chunk']} | {r['blas']['description']} | {r['median_s']:.3f} "
            f"| {r['min_s']:.3f} | {r.get('median_cpu_s', float('nan')):.3f} | {r['tokens_per_s']:,.0f} | {_mb(r['memory']['peak_rss_delta_bytes'])} "
            f"| {_mb(r['memory'].get('mlx_peak_delta_bytes'))} | {_g(r['achieved_flops_per_s'])} "
            f"| {_g(mm.get('flops_per_s'))} | {'—' if eff is None else f'{eff:.0%}'} |")
    comps = doc.get("comparisons") or []
    if comps:
        lines += ["", "| n | C | speed-up (torch time / mlx time) | CPU-time speed-up | peak memory mlx / torch "
                  "| target (faster, ≤ 1/4 memory) |", "|---:|---:|---:|---:|---:|---|"]
        for c in comps:
            mr = c["mlx_over_torch_peak_memory"]
            cs = c.get("cpu_time_speedup_mlx_over_torch")
            lines.append(f"| {c['seq_len']} | {c['chunk']} | {c['speedup_mlx_over_torch']:.2f}× "
                         f"| {'—' if cs is None else f'{cs:.2f}×'} "
                         f"| {'—' if mr is None else f'{mr:.3f}'} | {'met' if c['target_met'] else 'missed'} |")
    forms = form_comparisons(doc["results"])
    if forms:
        lines += ["", "| n | C | titans_mlx speed-up over its loop form (loop time / time) |", "|---:|---:|---:|"]
        lines += [f"| {f['seq_len']} | {f['chunk']} | {f['speedup_over_loop']:.2f}× |" for f in forms]
    checks = [(r["seq_len"], r["chunk"], r["check"], IMPL_NAMES.get(r["impl"])) for r in doc["results"]
              if r.get("status") == "ok" and r.get("check")]
    if checks:
        lines += [""]
        for n, c, ch, name in checks:
            if "max_abs_diff_vs_torch" in ch:
                lines.append(f"- n={n}, C={c}: {name} ran on titans-pytorch's weights and input; output max abs "
                             f"diff {ch['max_abs_diff_vs_torch']:.2e} (relative {ch['max_rel_diff_vs_torch']:.2e}).")
            else:
                lines.append(f"- n={n}, C={c}: weights {ch['weights']}.")
    profiled = [r for r in doc["results"] if r.get("status") == "ok" and r.get("profile")]
    if profiled:
        from bench.profile import markdown as prof_md
        lines += ["", "## Profile (Linux perf, timed runs only; timings above are perturbed by sampling)", ""]
        for r in profiled:
            lines += prof_md(f"{IMPL_NAMES.get(r['impl'])} n={r['seq_len']} C={r['chunk']}", r["profile"])
    lines += ["", "Environment:", ""]
    v = env.get("versions", {})
    wv = {}
    for r in doc["results"]:
        wv.update(r.get("versions") or {})
    wv = wv or v
    lines.append(f"- machine: {env['cpu']} ({env['cpu_count']} CPUs, {env['machine']}), "
                 f"{_g(env.get('memory_total_bytes'))} GB RAM; {env['os']}")
    lines.append("- versions: " + ", ".join(f"{k} {wv[k]}" for k in
                                           ("python", "mlx", "mlx-cpu", "mlx-metal", "torch", "titans-pytorch",
                                            "titans-mlx", "numpy") if k in wv))
    backends = []
    for r in doc["results"]:
        if r.get("status") == "ok":
            b = r["backend"]
            desc = f"{IMPL_NAMES.get(r['impl'])}: {b['framework']} {b.get('device')}, BLAS {r['blas']['description']}"
            if r["blas"].get("openblas_config"):
                desc += f" [{r['blas']['openblas_config']}]"
            if b.get("blas_build"):
                desc += f" [{b['blas_build']}; CPU capability {b.get('cpu_capability')}]"
            if desc not in backends:
                backends.append(desc)
    for b in backends:
        lines.append(f"- {b}")
    g = env.get("git", {})
    lines.append(f"- git commit {g.get('commit')}{' (dirty)' if g.get('dirty') else ''}; {env['timestamp_utc']}; "
                 f"load average at start {env.get('loadavg')}")
    lines.append(f"- command: `{env['command']}`")
    lines.append("")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(doc: dict, path: str) -> bool:
    """Time and peak memory per (n, C) for each implementation. False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    if not ok:
        return False
    if len({r["seq_len"] for r in ok}) >= 3:
        return _plot_sweep(doc, ok, path, plt)
    keys = sorted({(r["seq_len"], r["chunk"]) for r in ok})
    impls = [i for i in IMPL_NAMES if any(r["impl"] == i for r in ok)]
    blas = {r["impl"]: r["blas"]["description"] for r in ok}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        rs = {(r["seq_len"], r["chunk"]): r for r in ok if r["impl"] == impl}
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(keys))]
        t = [rs[k]["median_s"] if k in rs else 0 for k in keys]
        m = [(rs[k]["memory"]["peak_rss_delta_bytes"] or 0) / 2**20 if k in rs else 0 for k in keys]
        label = f"{IMPL_NAMES[impl]} ({blas[impl].split(' (')[0]})"
        b0 = axes[0].bar(xs, t, width, label=label)
        b1 = axes[1].bar(xs, m, width, label=label)
        axes[0].bar_label(b0, fmt="%.2f", fontsize=8)
        axes[1].bar_label(b1, fmt="%.0f", fontsize=8)
    labels = [f"n={n}\nC={c}" for n, c in keys]
    for ax, title in zip(axes, ("median time per forward (s)", "peak RSS above baseline (MiB)")):
        ax.set_xticks(range(len(keys)), labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
    cfg = doc["config"]
    fig.suptitle(f"NeuralMemory(dim={cfg['dim']}) store+retrieve, batch {cfg['batch']}, {cfg['threads']} thread(s) "
                 f"— {doc['environment']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_sweep(doc, ok, path, plt) -> bool:
    """Tokens/s and peak memory against sequence length (log-x), one line per (implementation, chunk)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["impl"], r["chunk"]) for r in ok}, key=lambda k: (k[0] != "torch", -k[1]))
    for impl, c in series:
        rs = sorted((r for r in ok if r["impl"] == impl and r["chunk"] == c), key=lambda r: r["seq_len"])
        xs = [r["seq_len"] for r in rs]
        style = dict(marker="o" if impl == "mlx" else "s", linestyle="-" if impl == "mlx" else "--",
                     label=f"{IMPL_NAMES[impl]} C={c} ({rs[0]['blas']['description'].split(' (')[0]})")
        line, = axes[0].plot(xs, [r["tokens_per_s"] for r in rs], **style)
        if all(r.get("median_cpu_s") for r in rs):  # per CPU-second: what a shared machine disturbs less
            axes[0].plot(xs, [r["batch"] * r["seq_len"] / r["median_cpu_s"] for r in rs], linestyle=":",
                         color=line.get_color(), alpha=0.6, label="  same, tokens per CPU-second")
        axes[1].plot(xs, [(r["memory"]["peak_rss_delta_bytes"] or 0) / 2**20 for r in rs], **style)
    skipped = sorted({(r["seq_len"], r["chunk"]) for r in doc["results"] if r.get("status") == "skipped"})
    for ax, title in zip(axes, ("tokens/s (median run, wall clock; dotted: per CPU-second)",
                                "peak RSS above baseline (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    cfg = doc["config"]
    note = ""
    if skipped:
        note = "\ntitans-pytorch not run (estimated memory over the limit): " + ", ".join(
            f"n={n} C={c}" for n, c in skipped)
    fig.suptitle(f"NeuralMemory(dim={cfg['dim']}) store+retrieve, batch {cfg['batch']}, {cfg['threads']} thread(s) "
                 f"— {doc['environment']['cpu']}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
