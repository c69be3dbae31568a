"""The outputs of ``python -m titans_mlx.inspect``: the numbers (JSON), one self-contained HTML page, a PNG.

The page has no network access and no external scripts or fonts: the data sit in a ``<script type="application/json">``
and an inline script draws everything (the text with ``textContent``, never as HTML: the document is user data).
It stays usable on long documents: consecutive tokens in the same colour are one span (a colour run), the text is
shown a page of ``PAGE_TOKENS`` tokens at a time, and the strip chart covers the whole document in at most
``CHART_BINS`` bins (click it to go to that part of the text).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from typing import List, Optional

import numpy as np

PAGE_TOKENS = 4000
CHART_BINS = 1000
# surprise colour buckets: quantiles of that layer and head's surprises over the document
QUANTILES = (0.5, 0.75, 0.9, 0.97, 0.99)
BUCKET_NAMES = ("lowest 50%", "50-75%", "75-90%", "90-97%", "97-99%", "top 1%")


def _floats(values, digits: int = 7) -> list:
    """float32 values as JSON numbers to `digits` significant digits (float32 holds about 7); NaN (no value) and
    infinities (a diverged memory, see LayerTrace.diverged_at) as null."""
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in np.asarray(values, np.float64).tolist()]


def report(trace, texts: List[str], model, model_path: str, document: str, needle: Optional[dict] = None) -> dict:
    """Everything the page, the PNG and the JSON show, as plain JSON-able values."""
    args = model.args
    return {
        "format": "titans_mlx.inspect/1",
        "model": model_path,
        "document": document,
        "tokens": len(trace.token_ids),
        "token_ids": list(map(int, trace.token_ids)),
        "token_text": texts,
        "segment_len": args.segment_len,
        "num_longterm_mem_tokens": args.num_longterm_mem_tokens,
        "chunk_size": trace.chunk_size,
        "surprise_of": ("the next token: with store_with_lookahead_value the key of token t is trained on the value "
                        "of token t+1, and the loss is drawn on t+1" if trace.lookahead else "the token itself"),
        "definitions": {
            "surprise": "store loss of the token before its chunk is written, mean over features of "
                        "(M(key) - value)^2 at the weights the chunk's gradient is taken at (return_surprises)",
            "step_size": "the learned per-token step size of the write (return_surprises' second output)",
            "forget": "forget gate alpha of each chunk: the weights are multiplied by 1 - alpha",
            "update_norm": "norm of the update the chunk added (the momentum term), over all memory weights",
            "weight_norm": "norm of the memory's weights after the chunk",
            "chunk_end_token": "tokens read when the chunk was written",
        },
        "layers": [
            {
                "layer": t.layer, "heads": t.heads, "diverged_at_token": t.diverged_at,
                "surprise": [_floats(row) for row in t.surprise],
                "step_size": [_floats(row) for row in t.step_size],
                "chunk_end_token": [int(e) for e in t.chunk_end],
                "forget": [_floats(row) for row in t.forget],
                "update_norm": [_floats(row) for row in t.update_norm],
                "weight_norm": [_floats(row) for row in t.weight_norm],
            }
            for t in trace.layers
        ],
        "needle": needle,
    }


def render_json(rep: dict) -> bytes:
    return (json.dumps(rep, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ---- the page --------------------------------------------------------------------------------------------------------


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _buckets(surprise: np.ndarray):
    """One character per token, '0'..'5' (quantile bucket) or '-' (no store loss), and the bucket edges."""
    finite = np.isfinite(surprise)
    if not finite.any():
        return "-" * surprise.size, []
    edges = np.quantile(surprise[finite], QUANTILES)
    index = np.digitize(np.where(finite, surprise, 0.0), edges, right=True)
    chars = np.where(finite, index.astype(str), "-")
    return "".join(chars.tolist()), [float(f"{e:.4g}") for e in edges]


def page_data(rep: dict) -> dict:
    """The page's data: per layer and head a series (numbers rounded for size, colour buckets), the texts once."""
    series = []
    for layer in rep["layers"]:
        for h in range(layer["heads"]):
            label = f"layer {layer['layer']}" + (f" · head {h + 1}" if layer["heads"] > 1 else "")
            surprise = _arr(layer["surprise"][h])
            buckets, edges = _buckets(surprise)
            series.append({
                "label": label, "layer": layer["layer"], "head": h + 1, "diverged_at": layer["diverged_at_token"],
                "surprise": _floats(surprise, 4), "step": _floats(_arr(layer["step_size"][h]), 4),
                "buckets": buckets, "edges": edges,
                "chunk_end": layer["chunk_end_token"],
                "forget": _floats(_arr(layer["forget"][h]), 4),
                "update": _floats(_arr(layer["update_norm"][h]), 4),
                "weight": _floats(_arr(layer["weight_norm"][h]), 4),
            })
    return {"model": rep["model"], "document": rep["document"], "tokens": rep["tokens"],
            "texts": rep["token_text"], "surprise_of": rep["surprise_of"], "series": series,
            "needle": rep["needle"], "page_tokens": PAGE_TOKENS, "bins": CHART_BINS,
            "bucket_names": list(BUCKET_NAMES)}


def _script_json(value) -> str:
    # inside <script> only "</script" or "<!--" could end or confuse the element: escape every <, > and &
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(rep: dict) -> bytes:
    parts = {"TITLE": html.escape(f"Memory of {rep['document']}"), "STYLE": _STYLE, "SCRIPT": _SCRIPT,
             "DATA": _script_json(page_data(rep))}
    # one pass, so that no part (the document's name, its text) is searched for the other placeholders
    return re.sub(r"__(TITLE|STYLE|SCRIPT|DATA)__", lambda m: parts[m.group(1)], _PAGE).encode("utf-8")


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px; color: #222;
       max-width: 1200px; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta, .note { color: #555; margin: 2px 0; }
#controls { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; margin: 10px 0; }
#legend { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
#legend .sw { display: inline-block; padding: 0 6px; border: 1px solid #ccc; border-radius: 3px; font-size: 12px; }
#chart svg { width: 100%; height: auto; border: 1px solid #ddd; background: #fff; cursor: pointer; }
#chart text { font: 11px system-ui, sans-serif; fill: #444; }
#needle { border: 1px solid #e6b800; background: #fffbe6; padding: 8px 12px; margin: 10px 0; border-radius: 4px; }
#needle table { border-collapse: collapse; }
#needle td, #needle th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
#pager { margin: 8px 0; }
#pager button { margin-right: 6px; }
#text { white-space: pre-wrap; word-wrap: break-word; font: 13px/1.6 ui-monospace, "DejaVu Sans Mono", monospace;
        border: 1px solid #ddd; padding: 10px; background: #fff; }
.b0 { background: #f7f4ea; } .b1 { background: #fde9a9; } .b2 { background: #fcc96b; }
.b3 { background: #f89a45; } .b4 { background: #ec6232; color: #fff; } .b5 { background: #b8232a; color: #fff; }
.bn { background: transparent; color: #777; }
.needle { text-decoration: underline 3px #1a5fd0; text-underline-offset: 3px; font-weight: bold; }
#errors, #warning { color: #b00; white-space: pre-wrap; }
footer { color: #666; font-size: 12px; margin-top: 14px; }
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<h1>What the document wrote into the memory</h1>
<p class="meta" id="meta"></p>
<div id="controls">
  <label>Memory <select id="sel"></select></label>
  <span id="legend"></span>
</div>
<div id="warning" hidden></div>
<div id="needle" hidden></div>
<div id="chart"></div>
<div id="pager"></div>
<div id="text"><noscript>This page draws the document with its inline script; enable JavaScript.</noscript></div>
<div id="errors"></div>
<footer id="footer"></footer>
<script type="application/json" id="data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_SCRIPT = r"""
"use strict";
window.addEventListener("error", (e) => {
  document.getElementById("errors").textContent += "script error: " + e.message + "\n";
});
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const N = D.tokens;
const PAGES = Math.max(1, Math.ceil(N / D.page_tokens));
const NEEDLE = D.needle && D.needle.tokens ? D.needle.tokens : null;
let sel = 0, page = NEEDLE ? Math.floor(NEEDLE[0] / D.page_tokens) : 0;

function node(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}
function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const a = Math.abs(v);
  return (a !== 0 && (a < 0.001 || a >= 10000)) ? v.toExponential(2) : String(+v.toPrecision(3));
}
function stats(values, a, b) {  // mean and max of the non-null values[a..b)
  let sum = 0, n = 0, max = -Infinity;
  for (let i = a; i < b; i++) {
    const v = values[i];
    if (v === null) continue;
    sum += v; n++; if (v > max) max = v;
  }
  return n ? { mean: sum / n, max: max, n: n } : null;
}

function header() {
  $("meta").textContent = D.document + " · " + N.toLocaleString("en") + " tokens · model " + D.model;
  const f = $("footer");
  f.appendChild(node("p", "Colour: the surprise of each token, the memory's store loss before its chunk is written " +
    "(NeuralMemory's return_surprises), as quantiles of the selected layer and head over the document. It belongs " +
    "to " + D.surprise_of + ". Uncoloured: no store loss (long-term memory tokens are not drawn; a chunk is stored " +
    "once complete, so the last unfinished chunk has none yet). Hover a run of text for its numbers."));
  f.appendChild(node("p", "Chart: per token surprise and step size (mean per bin), per chunk the forget gate alpha " +
    "(the weights are multiplied by 1 - alpha), the norm of the update the chunk added and the norm of the weights " +
    "after it. Click the chart to show that part of the text."));
}

function selector() {
  const s = $("sel");
  D.series.forEach((x, i) => { const o = node("option", x.label); o.value = String(i); s.appendChild(o); });
  s.addEventListener("change", () => { sel = Number(s.value); draw(); });
}

function warning() {
  const x = D.series[sel], box = $("warning");
  box.hidden = x.diverged_at === null;
  box.textContent = x.diverged_at === null ? "" : x.label + ": the memory's numbers are not finite from token " +
    x.diverged_at + " on (its inner gradient descent diverged); those tokens are uncoloured and off the chart.";
}

function legend() {
  const box = $("legend"), x = D.series[sel];
  box.replaceChildren(node("span", "surprise:"));
  const e = x.edges;
  for (let b = 0; b < D.bucket_names.length; b++) {
    if (!e.length) break;
    const range = b === 0 ? "\u2264 " + fmt(e[0]) : b === e.length ? "> " + fmt(e[b - 1])
      : fmt(e[b - 1]) + "\u2013" + fmt(e[b]);
    const sw = node("span", range, "sw b" + b);
    sw.title = D.bucket_names[b] + " of this layer's surprises";
    box.appendChild(sw);
  }
  box.appendChild(node("span", "no store loss", "sw bn"));
  if (NEEDLE) box.appendChild(node("span", "needle", "sw needle"));
}

function tip(x, a, b) {
  const s = stats(x.surprise, a, b), l = stats(x.step, a, b);
  const where = b - a === 1 ? "token " + a : "tokens " + a + "\u2013" + (b - 1);
  if (!s) return where + " \u00b7 no store loss";
  const sur = s.n === 1 ? "surprise " + fmt(s.mean) : "surprise mean " + fmt(s.mean) + ", max " + fmt(s.max);
  const step = !l ? "" : l.n === 1 ? " \u00b7 step size " + fmt(l.mean) : " \u00b7 step size mean " + fmt(l.mean);
  return where + " \u00b7 " + sur + step;
}

function text() {
  const x = D.series[sel], box = $("text"), frag = document.createDocumentFragment();
  const a0 = page * D.page_tokens, a1 = Math.min(N, a0 + D.page_tokens);
  const inNeedle = (i) => NEEDLE !== null && i >= NEEDLE[0] && i < NEEDLE[1];
  let i = a0, spans = 0;
  while (i < a1) {  // one span per colour run; a token without text (part of a character) joins the run
    const b = x.buckets[i], nd = inNeedle(i);
    let j = i + 1;
    while (j < a1 && inNeedle(j) === nd && (x.buckets[j] === b || D.texts[j] === "")) j++;
    const span = node("span", D.texts.slice(i, j).join(""), (b === "-" ? "bn" : "b" + b) + (nd ? " needle" : ""));
    span.title = tip(x, i, j);
    frag.appendChild(span);
    spans++;
    i = j;
  }
  box.replaceChildren(frag);
  box.dataset.spans = String(spans);
  box.dataset.tokens = String(a1 - a0);
}

function pager() {
  const box = $("pager");
  box.replaceChildren();
  if (PAGES === 1) return;
  const a0 = page * D.page_tokens, a1 = Math.min(N, a0 + D.page_tokens);
  const prev = node("button", "\u2039 previous"), next = node("button", "next \u203a");
  prev.disabled = page === 0; next.disabled = page === PAGES - 1;
  prev.addEventListener("click", () => { page--; draw(); });
  next.addEventListener("click", () => { page++; draw(); });
  box.append(prev, next, node("span", "tokens " + a0.toLocaleString("en") + "\u2013" + (a1 - 1).toLocaleString("en") +
    " of " + N.toLocaleString("en") + " (page " + (page + 1) + " of " + PAGES + "; the chart covers all of them)"));
}

function binned(xs, ys, bins) {  // mean y per x-bin over [0, N]; xs null: x = index + 0.5
  const sum = new Float64Array(bins), cnt = new Float64Array(bins);
  for (let i = 0; i < ys.length; i++) {
    const v = ys[i];
    if (v === null) continue;
    const x = xs ? xs[i] : i + 0.5;
    const k = Math.min(bins - 1, Math.floor(x / N * bins));
    sum[k] += v; cnt[k]++;
  }
  const out = [];
  for (let k = 0; k < bins; k++) if (cnt[k]) out.push([(k + 0.5) * N / bins, sum[k] / cnt[k]]);
  return out;
}

function chart() {
  const x = D.series[sel], W = 1000, ML = 120, MR = 10, RH = 54, GAP = 8, TOP = 6;
  const bins = Math.max(1, Math.min(D.bins, N));
  const chunkBins = Math.max(1, Math.min(D.bins, x.chunk_end.length));
  const rows = [
    ["surprise", binned(null, x.surprise, bins), "#c0392b"],
    ["step size", binned(null, x.step, bins), "#2e7d32"],
    ["forget gate \u03b1", binned(x.chunk_end, x.forget, chunkBins), "#6a1b9a"],
    ["update norm", binned(x.chunk_end, x.update, chunkBins), "#ef6c00"],
    ["weight norm", binned(x.chunk_end, x.weight, chunkBins), "#1565c0"],
  ];
  const H = TOP + rows.length * (RH + GAP) + 18;
  const s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
  s.appendChild(node("title", "surprise, step size, forget gate, update and weight norm along the document"));
  const X = (t) => ML + (W - ML - MR) * (N ? t / N : 0);
  const a0 = page * D.page_tokens, a1 = Math.min(N, a0 + D.page_tokens);
  if (PAGES > 1) s.appendChild(svg("rect", { x: X(a0), y: 0, width: Math.max(1, X(a1) - X(a0)), height: H - 18,
    fill: "#e3eefc" }));
  if (NEEDLE) s.appendChild(svg("rect", { x: X(NEEDLE[0]), y: 0, width: Math.max(2, X(NEEDLE[1]) - X(NEEDLE[0])),
    height: H - 18, fill: "#1a5fd0", opacity: 0.4 }));
  rows.forEach(([name, pts, colour], r) => {
    const y0 = TOP + r * (RH + GAP);
    s.appendChild(svg("rect", { x: ML, y: y0, width: W - ML - MR, height: RH, fill: "none", stroke: "#ddd" }));
    const label = svg("text", { x: 4, y: y0 + 14 });
    label.textContent = name;
    s.appendChild(label);
    if (!pts.length) {
      const t = svg("text", { x: ML + 6, y: y0 + RH / 2 + 4 });
      t.textContent = "no complete chunk yet";
      s.appendChild(t);
      return;
    }
    let lo = Infinity, hi = -Infinity;
    for (const p of pts) { if (p[1] < lo) lo = p[1]; if (p[1] > hi) hi = p[1]; }
    if (hi === lo) { hi = lo + (Math.abs(lo) || 1) * 1e-3; }
    const Y = (v) => y0 + RH - 3 - (RH - 6) * (v - lo) / (hi - lo);
    const range = svg("text", { x: 4, y: y0 + 30 });
    range.textContent = fmt(lo) + " \u2013 " + fmt(hi);
    s.appendChild(range);
    const line = pts.length === 1 ? svg("circle", { cx: X(pts[0][0]), cy: Y(pts[0][1]), r: 2, fill: colour })
      : svg("polyline", { points: pts.map((p) => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" "),
        fill: "none", stroke: colour, "stroke-width": 1.2 });
    s.appendChild(line);
  });
  const axis = TOP + rows.length * (RH + GAP) + 10;
  for (let k = 0; k <= 4; k++) {
    const t = svg("text", { x: X(N * k / 4) - (k === 4 ? 40 : k === 0 ? 0 : 20), y: axis });
    t.textContent = Math.round(N * k / 4).toLocaleString("en");
    s.appendChild(t);
  }
  s.addEventListener("click", (e) => {
    const box = s.getBoundingClientRect();
    const vx = (e.clientX - box.left) / box.width * W;
    const token = Math.floor((vx - ML) / (W - ML - MR) * N);
    if (token < 0 || token >= N) return;
    page = Math.min(PAGES - 1, Math.floor(token / D.page_tokens));
    draw();
  });
  $("chart").replaceChildren(s);
}

function needlePanel() {
  const nd = D.needle;
  if (!nd) return;
  const box = $("needle");
  box.hidden = false;
  const where = nd.tokens ? " at tokens " + nd.tokens[0] + "\u2013" + (nd.tokens[1] - 1) : " (not found in the text)";
  box.appendChild(node("div", "Needle \u201c" + nd.needle + "\u201d planted at depth " + nd.depth + where +
    "; question at the end: \u201c" + nd.question + "\u201d"));
  const t = node("table");
  const row = (cells, head) => {
    const tr = node("tr");
    cells.forEach((c) => tr.appendChild(node(head ? "th" : "td", c)));
    t.appendChild(tr);
  };
  row(["", "memory learning", "memory frozen"], true);
  row(["greedy answer", "\u201c" + nd.answer_learning + "\u201d", "\u201c" + nd.answer_frozen + "\u201d"]);
  row(["pass key " + nd.pass_key + " in it", nd.recalled_learning ? "yes" : "no", nd.recalled_frozen ? "yes" : "no"]);
  const pct = (v) => v === null ? "-" : (100 * v).toFixed(2) + "%";
  nd.layers.forEach((l) => {
    row(["layer " + l.layer + ": read at the question moves", pct(l.read_change_learning), pct(l.read_change_frozen)]);
  });
  box.appendChild(t);
  nd.layers.forEach((l) => {
    if (l.surprise_needle === null) return;
    const parts = l.surprise_needle.map((v, h) => fmt(v) + " vs " + fmt(l.surprise_rest[h]) +
      " (step size " + fmt(l.step_needle[h]) + " vs " + fmt(l.step_rest[h]) + ")");
    box.appendChild(node("div", "layer " + l.layer + ": mean surprise on the needle's tokens vs the rest " +
      parts.join("; "), "note"));
  });
  box.appendChild(node("div", "\u201cRead moves\u201d: how far the memory's output at the question's last token " +
    "changes (relative norm) when only the pass key's digits change (to \u201c" + nd.control_needle + "\u201d). " +
    "Frozen, the memory writes nothing, so whatever moves there came through attention, not the memory. " +
    "A read that moves shows the needle reached the memory; the answer row shows whether the model recalls it.",
    "note"));
}

function draw() {
  warning();
  legend();
  chart();
  pager();
  text();
  let done = $("rendered");
  if (!done) { done = node("span"); done.id = "rendered"; done.hidden = true; document.body.appendChild(done); }
  done.dataset.series = String(sel);
}

header();
selector();
needlePanel();
draw();
"""


# ---- the PNG ---------------------------------------------------------------------------------------------------------


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    """NaN-aware centred moving mean."""
    ok = np.isfinite(values)
    kernel, start = np.ones(window), (window - 1) // 2
    # "full" then the centred slice: mode="same" returns the kernel's length for a series shorter than it
    centred = lambda a: np.convolve(a, kernel, mode="full")[start:start + len(values)]
    sums, counts = centred(np.where(ok, values, 0.0)), centred(ok.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def render_png(rep: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(8, rep["segment_len"])
    rows = [("surprise", "surprise"), ("step size", "step_size"), ("forget gate α", "forget"),
            ("update norm", "update_norm"), ("weight norm", "weight_norm")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 7.5), sharex=True)
    x_tokens = np.arange(rep["tokens"]) + 0.5
    for layer in rep["layers"]:
        for h in range(layer["heads"]):
            label = f"layer {layer['layer']}" + (f" head {h + 1}" if layer["heads"] > 1 else "")
            for ax, (_, key) in zip(axes, rows):
                values = _arr(layer[key][h])
                if key in ("surprise", "step_size"):
                    ax.plot(x_tokens, _rolling(values, window), lw=1, label=label)
                else:
                    ax.plot(layer["chunk_end_token"], values, lw=1, label=label)
    needle = rep.get("needle")
    for ax, (name, key) in zip(axes, rows):
        suffix = f"\n(mean of {window})" if key in ("surprise", "step_size") else "\n(per chunk)"
        ax.set_ylabel(name + suffix, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if needle and needle.get("tokens"):
            a, b = needle["tokens"]
            ax.axvspan(a, max(b, a + 1), color="#1a5fd0", alpha=0.3, lw=0)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("tokens read", fontsize=8)
    title = f"What {rep['document']} wrote into the memory ({rep['tokens']:,} tokens)"
    if needle and needle.get("tokens"):
        title += f"; needle (blue) at tokens {needle['tokens'][0]}-{needle['tokens'][1] - 1}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def needle_line(needle: dict) -> str:
    """One line for the terminal: the answers and how far each memory's read moved."""
    moves = ", ".join(
        f"layer {l['layer']} {100 * l['read_change_learning']:.2f}% (frozen {100 * l['read_change_frozen']:.2f}%)"
        for l in needle["layers"] if l["read_change_learning"] is not None)
    return (f"needle at tokens {needle['tokens']}: answer {needle['answer_learning']!r} with the memory learning, "
            f"{needle['answer_frozen']!r} frozen; the read at the question moves with the pass key: {moves}")
