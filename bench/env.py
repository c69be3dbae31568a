"""What a benchmark ran on: machine, OS, CPU, versions, git commit, BLAS, and memory probes.

Imports only the standard library (psutil is used when present, never required).
"""

from __future__ import annotations

import ctypes
import hashlib
import datetime as _dt
import importlib.metadata as _md
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# distributions whose versions matter to a result
DISTRIBUTIONS = (
    "mlx", "mlx-cpu", "mlx-metal", "mlx-cuda-12", "mlx-cuda-13", "mlx-lm",
    "torch", "titans-pytorch", "titans-mlx", "numpy", "matplotlib", "psutil",
)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            pass
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> str:
    info = _read("/proc/cpuinfo")
    if info:
        m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        if m:
            return m.group(1).strip()
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown"


def os_name() -> str:
    rel = _read("/etc/os-release")
    if rel:
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', rel, re.M)
        if m:
            return f"{m.group(1)} (kernel {platform.release()})"
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return platform.platform()


def total_memory_bytes() -> int | None:
    info = _read("/proc/meminfo")
    if info:
        m = re.search(r"^MemTotal:\s*(\d+) kB", info, re.M)
        if m:
            return int(m.group(1)) * 1024
    try:
        import psutil  # optional
        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def git_info() -> dict:
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=all", "--", "titans_mlx", "bench/*.py")
    # what was measured, even when it is not committed yet
    sources = {}
    for path in sorted((ROOT / "titans_mlx").glob("*.py")):
        sources[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None,
            "dirty_files": dirty.splitlines() if dirty else [], "titans_mlx_sha256_16": sources}


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "os": os_name(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": total_memory_bytes(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
    }


def environment(argv: list[str]) -> dict:
    """The run's environment as seen by the launching process (workers add their own backend, BLAS, versions)."""
    env = machine()
    env["versions"] = versions()
    env["git"] = git_info()
    env["command"] = shlex.join([sys.executable, "-m", "bench", *argv])
    env["cwd"] = os.getcwd()
    env["ld_preload"] = os.environ.get("LD_PRELOAD")
    env["timestamp_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        env["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return env


# ---------------------------------------------------------------------------------------------- BLAS

_BLAS_RE = re.compile(r"(blas|lapack|mkl|openblas|accelerate|veclib|gfortran|cublas)", re.I)


def mapped_blas_libraries(pid: int | str = "self") -> list[str] | None:
    """Shared objects mapped into a process whose names look like BLAS/LAPACK (None where /proc is absent)."""
    maps = _read(f"/proc/{pid}/maps")
    if maps is None:
        return None
    libs = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            path = parts[5]
            if _BLAS_RE.search(os.path.basename(path)) and path not in libs:
                libs.append(path)
    return libs


def openblas_config(libs: list[str]) -> str | None:
    """OpenBLAS's own build/version string, from the library already loaded in this process."""
    for path in libs:
        if "openblas" in path.lower() and not _numpy_own(path):
            try:
                lib = ctypes.CDLL(path)
                fn = lib.openblas_get_config
                fn.restype = ctypes.c_char_p
                cfg = fn().decode()
                try:
                    cfg += f"; threads={lib.openblas_get_num_threads()}"
                except AttributeError:
                    pass
                return cfg
            except (OSError, AttributeError):
                continue
    return None


def _numpy_own(path: str) -> bool:
    # numpy wheels bundle a symbol-prefixed OpenBLAS (scipy_openblas) that only numpy itself calls
    return "numpy.libs" in path or "scipy_openblas" in os.path.basename(path)


def describe_blas(libs: list[str] | None, torch_blas_info: str | None = None) -> str:
    """Which BLAS the framework's matmuls go to (numpy's private OpenBLAS is ignored)."""
    if libs is not None:
        libs = [p for p in libs if not _numpy_own(p)]
    if torch_blas_info:
        name = {"mkl": "MKL", "open": "OpenBLAS"}.get(torch_blas_info, torch_blas_info)
        extra = " (an OpenBLAS is also mapped)" if libs and any("openblas" in p.lower() for p in libs) else ""
        return f"{name} (linked into libtorch_cpu){extra}"
    if libs is None:
        return "Accelerate (macOS)" if sys.platform == "darwin" else "unknown (no /proc)"
    if any("openblas" in p.lower() for p in libs):
        return "OpenBLAS"
    if any("mlx_cpu.libs" in p and "libblas" in os.path.basename(p) for p in libs):
        return "reference BLAS (bundled with the mlx-cpu wheel)"
    blas = [p for p in libs if "blas" in os.path.basename(p).lower()]
    return os.path.basename(blas[0]) if blas else "none mapped"


def find_openblas() -> str | None:
    """Path of an OpenBLAS that exports the reference BLAS symbols (Debian: libopenblas0-pthread)."""
    if os.environ.get("TITANS_BENCH_OPENBLAS"):
        return os.environ["TITANS_BENCH_OPENBLAS"]
    try:
        r = subprocess.run(["dpkg", "-L", "libopenblas0-pthread"], capture_output=True, text=True, timeout=10)
        for line in r.stdout.splitlines():
            if line.endswith("/openblas-pthread/libblas.so.3") and os.path.exists(line):
                return line
    except (OSError, subprocess.SubprocessError):
        pass
    from titans_mlx.blas import find_openblas as installed  # the places the CLIs look, one list

    return installed()


# ---------------------------------------------------------------------------------------------- memory
# Both implementations are measured the same way: resident set size of the worker process, read from
# /proc/self/status (VmRSS, VmHWM) on Linux; the high-water mark is reset after set-up by writing "5" to
# /proc/self/clear_refs. Elsewhere getrusage's ru_maxrss (no reset possible) is the fallback.

def _status_kb(field: str) -> int | None:
    status = _read("/proc/self/status")
    if status:
        m = re.search(rf"^{field}:\s*(\d+) kB", status, re.M)
        if m:
            return int(m.group(1)) * 1024
    return None


def rss_bytes() -> int | None:
    v = _status_kb("VmRSS")
    if v is not None:
        return v
    try:
        import psutil  # optional
        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    v = _status_kb("VmHWM")
    if v is not None:
        return v
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


def environment_lines(doc: dict, names: dict) -> list[str]:
    """The 'Environment:' section of a report: machine, versions and BLAS the workers recorded, git, command."""
    env, v = doc["environment"], {}
    for r in doc["results"]:
        v.update(r.get("versions") or {})
    blas = sorted({f"{names[r['impl']]}: {r['blas']['description']}"
                   + (f" [{r['blas']['openblas_config']}]" if r["blas"].get("openblas_config") else "")
                   for r in doc["results"] if r.get("status") == "ok"})
    g = env.get("git", {})
    return ["", "Environment:", "",
            f"- machine: {env['cpu']} ({env['cpu_count']} CPUs), {(env.get('memory_total_bytes') or 0) / 1e9:.1f} GB "
            f"RAM; {env['os']}",
            "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "mlx", "mlx-lm", "torch", "titans-pytorch",
                                                               "numpy") if k in v),
            "- BLAS: " + "; ".join(blas),
            f"- git commit {g.get('commit')}{' (dirty)' if g.get('dirty') else ''}; {env['timestamp_utc']}; load "
            f"average at start {env.get('loadavg')}",
            f"- command: `{env['command']}`", ""]


def run_worker(module: str, python: str, cfg: dict, tmp: str, env: dict, timeout: float) -> tuple[dict | None, str]:
    """Run ``python -m module cfg.json res.json`` from the repository root: (its result, or None and why not)."""
    import json

    cfg_path, res_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "res.json")
    if os.path.exists(res_path):
        os.remove(res_path)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    try:
        proc = subprocess.run([python, "-m", module, cfg_path, res_path], env=env, cwd=str(ROOT),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = None
    if os.path.exists(res_path):
        with open(res_path) as f:
            return json.load(f), ""
    return None, "worker timed out" if proc is None else f"worker exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
