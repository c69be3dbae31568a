"""Summary, markdown table (llama-bench naming: pp<N>, tg<N> @ d<depth>) and PNG plots of `python -m bench mac`."""

from __future__ import annotations

from bench import env as E
from bench.report import pyplot
from bench.mac import NAMES, ORDER


def _ok(doc, impl):
    return {r["depth"]: r for r in doc["results"] if r.get("impl") == impl and r.get("status") == "ok"}


def _k(d):
    return f"{d // 1024}K" if d % 1024 == 0 else str(d)


def summary(doc: dict) -> dict:
    """Targets (decode at 32K >= 90 % of 1K; peak memory at 128K within 10 % of 4K) and the torch/mlx logit check."""
    out = {}
    for impl in ("mlx", "llama", "torch"):
        rs = _ok(doc, impl)
        s = {}
        if 1024 in rs and 32768 in rs:
            r = rs[32768]["decode_tokens_per_s"] / rs[1024]["decode_tokens_per_s"]
            rc = rs[32768]["decode_tokens_per_cpu_s"] / rs[1024]["decode_tokens_per_cpu_s"]
            s["decode_32k_over_1k"] = r
            s["decode_32k_over_1k_cpu_time"] = rc
            s["decode_target_met"] = r >= 0.9
        if 4096 in rs and 131072 in rs:
            a, b = rs[4096]["memory"]["peak_rss_delta_bytes"], rs[131072]["memory"]["peak_rss_delta_bytes"]
            s["peak_rss_128k_over_4k"] = b / a if a else None
            if impl != "torch":
                s["mlx_peak_128k_over_4k"] = rs[131072]["mlx_peak_delta_bytes"] / rs[4096]["mlx_peak_delta_bytes"]
            s["memory_target_met"] = bool(a and b / a <= 1.10)
        if s:
            out[impl] = s
    t, m = _ok(doc, "torch"), _ok(doc, "mlx")
    checks = []
    for d in sorted(set(t) & set(m)):
        a, b = t[d].get("last_logits"), m[d].get("last_logits")
        if a and b and len(a) == len(b):
            diff = max(abs(x - y) for x, y in zip(a, b))
            checks.append({"depth": d, "max_abs_diff_last_logits": diff,
                           "max_rel": diff / max(max(abs(x) for x in a), 1e-30),
                           "same_greedy_tokens": t[d].get("generated") == m[d].get("generated")})
    if checks:
        out["torch_vs_mlx"] = checks
    return out


def _mb(x):
    return "—" if x is None else f"{x / 2**20:,.0f}"


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    mac = cfg["mac_config"]
    L = [f"# MAC prefill/decode against context depth ({doc['name']})", "",
         f"MAC config (random weights; titans_mlx on titans-pytorch's weights when both ran): `{mac}`. "
         f"Reference: mlx-lm llama `{cfg['llama_config']}`. {cfg['threads']} thread(s); prefill block "
         f"{cfg['prefill_step']} tokens for the MLX models (titans_mlx.generate.generate_step), one parallel forward "
         "for titans-pytorch; greedy decode. Each (model, depth) in a fresh process: random prompt of d tokens, "
         f"then tg{cfg['tg']}.", "",
         "Tests (llama-bench names): `pp<d>` = prefill of the d-token context from empty (average); `pp<B> @ d<x>` = "
         "the last full prefill block (B tokens on top of x); `tg<N> @ d<d>` = N decoded tokens after the context. "
         "t/s = wall-clock tokens/s, CPU t/s = tokens per second of process CPU time (less disturbed by other load); "
         "primitives/token: MLX primitives in the graph of each of the next window of decoded tokens, mean (min–max; "
         "a compiled function counts as the primitives it compiles to, each fused element-wise group one), what "
         "each decoded token dispatches.",
         "", "| model | BLAS | test | t/s | CPU t/s | primitives/token |", "|---|---|---|---:|---:|---:|"]
    for impl in ORDER:
        for r in doc["results"]:
            if r.get("impl") != impl:
                continue
            if r.get("status") != "ok":
                L.append(f"| {NAMES[impl]} | — | d{_k(r['depth'])} | {r.get('status')}: {r.get('error', '')[:90]} | | |")
                continue
            blas = r["blas"]["description"].split(" (")[0]
            L.append(f"| {NAMES[impl]} | {blas} | pp{r['depth']} | {r['prefill_tokens_per_s']:,.0f} "
                     f"| {r['depth'] / max(r['prefill_cpu_s'], 1e-9):,.0f} | |")
            if r.get("last_block"):
                b = r["last_block"]
                L.append(f"| {NAMES[impl]} | {blas} | pp{b['tokens']} @ d{b['at_depth']} | {b['tokens_per_s']:,.0f} | | |")
            prims = r.get("primitives_per_token")
            L.append(f"| {NAMES[impl]} | {blas} | tg{r['tg']} @ d{r['depth']} | {r['decode_tokens_per_s']:.1f} "
                     f"| {r['decode_tokens_per_cpu_s'] or 0:.1f} | "
                     + (f"{prims['mean']:,.0f} ({prims['min']:,}–{prims['max']:,})" if prims else "") + " |")
    L += ["", "Peak memory against context (above the process's post-set-up baseline; RSS high-water mark over "
          "prefill + decode, and MLX's own peak allocation):", "",
          "| model | depth | peak RSS Δ MiB | … after prefill | MLX peak Δ MiB | cache after prefill MiB | load avg |",
          "|---|---:|---:|---:|---:|---:|---|"]
    for impl in ORDER:
        for d, r in sorted(_ok(doc, impl).items()):
            m = r["memory"]
            L.append(f"| {NAMES[impl]} | {d} | {_mb(m['peak_rss_delta_bytes'])} "
                     f"| {_mb(m.get('peak_rss_delta_after_prefill_bytes'))} | {_mb(r.get('mlx_peak_delta_bytes'))} "
                     f"| {_mb(r.get('cache_bytes_after_prefill'))} "
                     f"| {', '.join(f'{x:.1f}' for x in r.get('loadavg_before', []))} |")
    s = doc.get("summary") or {}
    L += ["", "Targets:", ""]
    for impl, v in s.items():
        if impl == "torch_vs_mlx":
            continue
        if "decode_32k_over_1k" in v:
            L.append(f"- {NAMES[impl]}: decode tok/s at 32K / at 1K = {v['decode_32k_over_1k']:.3f} (CPU time: "
                     f"{v['decode_32k_over_1k_cpu_time']:.3f}); target >= 0.90: "
                     f"{'met' if v['decode_target_met'] else 'missed'}")
        if "peak_rss_128k_over_4k" in v:
            extra = f", MLX peak {v['mlx_peak_128k_over_4k']:.3f}" if "mlx_peak_128k_over_4k" in v else ""
            L.append(f"- {NAMES[impl]}: peak RSS at 128K / at 4K = {v['peak_rss_128k_over_4k']:.3f}{extra}; target "
                     f"<= 1.10: {'met' if v['memory_target_met'] else 'missed'}")
    for c in s.get("torch_vs_mlx", []):
        L.append(f"- d={c['depth']}: titans_mlx on titans-pytorch's weights, last prefill logits max abs diff "
                 f"{c['max_abs_diff_last_logits']:.2e} (relative {c['max_rel']:.2e}); same 16 greedy tokens: "
                 f"{c['same_greedy_tokens']}")
    skipped = [r for r in doc["results"] if r.get("status") == "skipped"]
    for impl in ORDER:
        sk = [r for r in skipped if r["impl"] == impl]
        if sk:
            L.append(f"- {NAMES[impl]} not run at depths {', '.join(str(r['depth']) for r in sk)} ({sk[0]['error']}).")
    L += E.environment_lines(doc, NAMES)
    return "\n".join(L)


def plot(doc: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    any_ok = False
    for impl in ORDER:
        rs = sorted(_ok(doc, impl).items())
        if not rs:
            continue
        any_ok = True
        xs = [d for d, _ in rs]
        st = dict(marker="o", label=NAMES[impl] + (" (cached decode)" if impl == "torch" else ""))
        line, = axes[0].plot(xs, [r["decode_tokens_per_s"] for _, r in rs], **st)
        cpu = dict(linestyle=":", color=line.get_color(), alpha=0.6, label="  same, per CPU-second")
        axes[0].plot(xs, [r["decode_tokens_per_cpu_s"] for _, r in rs], **cpu)
        axes[1].plot(xs, [r["prefill_tokens_per_s"] for _, r in rs], **st)
        axes[1].plot(xs, [d / r["prefill_cpu_s"] for d, r in rs], **cpu)
        axes[2].plot(xs, [r["memory"]["peak_rss_delta_bytes"] / 2**20 for _, r in rs], **dict(st, label=st["label"] + ": peak RSS"))
        if impl != "torch":
            axes[2].plot(xs, [r["mlx_peak_delta_bytes"] / 2**20 for _, r in rs], linestyle=":", marker=".",
                         color=axes[2].lines[-1].get_color(), label=f"{NAMES[impl]}: MLX peak allocation")
    if not any_ok:
        plt.close(fig)
        return False
    titles = (f"decode tg{doc['config']['tg']} @ depth (tokens/s; dotted: per CPU-second)",
              "prefill of the context (tokens/s; dotted: per CPU-second)",
              "peak memory above baseline (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # linear from zero: flat is flat, a few % of noise looks like a few %
        ax.set_xlabel("context depth (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    blas = sorted({r["blas"]["description"].split(" (")[0] for r in doc["results"]
                   if r.get("status") == "ok" and r["impl"] != "torch"})
    mac = doc["config"]["mac_config"]
    fig.suptitle(f"MAC dim {mac['dim']}, depth {mac['depth']}, segment {mac['segment_len']}, sliding "
                 f"{mac.get('sliding_window_attn', False)}; MLX BLAS {', '.join(blas)}; {doc['config']['threads']} "
                 f"thread(s) — {doc['environment']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
