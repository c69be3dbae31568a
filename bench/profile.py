"""`--profile`: sample the timed runs of a worker with Linux `perf record` (same tool for both implementations)
and summarise where the CPU time went, by native symbol and by category (BLAS, JIT kernels, libm, ...)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

# mx.compile on CPU builds one shared library per fused kernel, named after its op graph
_JIT = re.compile(r"^lib\w*(?:[fb]\d{1,2}[IO]|_(?:contiguous|strided|general))")
_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")


def available() -> bool:
    return shutil.which("perf") is not None


def prepare(tmp: str, tag: str, freq: int = 499) -> tuple[list[str], dict, str]:
    """Command prefix, worker config additions and the data path; sampling starts disabled and the worker
    switches it on for the timed runs only."""
    ctl, ack, data = (os.path.join(tmp, f"{tag}.{s}") for s in ("ctl", "ack", "perf.data"))
    for f in (ctl, ack):
        if os.path.exists(f):
            os.remove(f)
        os.mkfifo(f)
    prefix = ["perf", "record", "-q", "-F", str(freq), "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", data, "--"]
    return prefix, {"perf_ctl": ctl, "perf_ack": ack}, data


def category(dso: str, sym: str) -> str:
    d, s = dso.lower(), sym.lower()
    if "openblas" in d or "libblas" in d or "gemm" in s or "mkl_blas" in s:
        return "BLAS (gemm and other BLAS kernels)"
    if _JIT.search(dso):
        return "MLX JIT-compiled (mx.compile) elementwise kernels"
    if d.startswith("libm.") or d.startswith("libm-"):
        return "libm (scalar erf/exp/fma called from kernels)"
    if d.startswith("libmlx"):
        return "libmlx (uncompiled ops: copies, reductions, elementwise, scans)"
    if "kernel" in d:
        return "OS kernel (page faults, zeroing new memory)"
    if d.startswith("libc.") or d.startswith("libc-"):
        return "libc (memcpy, memset, malloc)"
    if "libtorch" in d or "libc10" in d:
        return "libtorch (non-BLAS aten ops)"
    if "gomp" in d or "omp" in d:
        return "OpenMP runtime"
    if "python" in d:
        return "Python interpreter"
    return "other"


def summarize(data: str, top: int = 25) -> dict:
    try:
        r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym",
                            "-g", "none", "--percent-limit", "0.05", "-q"],
                           capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"perf report failed: {e}"}
    rows = []
    for line in r.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            pct, dso, sym = float(m.group(1)), m.group(2), m.group(4)
            rows.append((pct, dso, sym))
    if not rows:
        return {"error": "perf recorded no samples: " + r.stderr.strip()[-200:]}
    cats = {}
    for pct, dso, sym in rows:
        c = category(dso, sym)
        cats[c] = cats.get(c, 0.0) + pct
    short = lambda dso: ("<mlx JIT kernel>" if category(dso, "").startswith("MLX JIT") else dso)  # noqa: E731
    return {"tool": "perf record -F 499 (timed runs only), perf report --sort dso,sym",
            "categories_percent": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_symbols": [{"percent": pct, "dso": short(dso), "symbol": sym[:120]} for pct, dso, sym in rows[:top]]}


def markdown(impl_name: str, prof: dict) -> list[str]:
    if "error" in prof:
        return [f"- {impl_name}: profile unavailable ({prof['error']})"]
    lines = [f"**{impl_name}** — share of CPU samples during the timed runs:", "",
             "| category | % |", "|---|---:|"]
    lines += [f"| {c} | {p:.1f} |" for c, p in prof["categories_percent"].items()]
    lines += ["", "| % | library | symbol |", "|---:|---|---|"]
    lines += [f"| {s['percent']:.1f} | {s['dso']} | `{s['symbol']}` |" for s in prof["top_symbols"][:15]]
    return lines + [""]
