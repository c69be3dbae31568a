"""On Linux, run MLX's CPU matmuls on the system OpenBLAS instead of the mlx-cpu wheel's reference BLAS.

The wheel bundles the reference BLAS (≈30-40x slower matmuls than OpenBLAS on one core); which BLAS MLX's symbols
resolve to is fixed when the process starts, so the command-line tools (``python -m titans_mlx.generate``,
``python -m titans_mlx.train``) re-execute themselves once with an installed OpenBLAS preloaded (``LD_PRELOAD``), as
``python -m bench --blas openblas`` does. Where none is installed they say once, in one line at the end of a
successful run, how to get it. ``TITANS_MLX_BLAS=stock`` keeps the wheel's BLAS and silences the hint; the library
itself (``titans_mlx.load``, ``generate(...)``) never changes the process.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable, Optional

ENV = "TITANS_MLX_BLAS"  # "stock": keep the wheel's BLAS; "openblas": set in the re-executed process
CANDIDATES = (  # Debian/Ubuntu's libopenblas0-pthread first: it exports the reference BLAS symbols MLX calls
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
HINT = ("note: MLX ran on the mlx-cpu wheel's reference BLAS, ~30x slower at matmuls than OpenBLAS; install it "
        "(Debian/Ubuntu: apt-get install libopenblas0-pthread) and titans-mlx uses it (TITANS_MLX_BLAS=stock: "
        "keep this BLAS and silence this note)")


def find_openblas() -> Optional[str]:
    """Path of an installed OpenBLAS that exports the reference BLAS symbols, or None."""
    arch = platform.machine()
    for candidate in CANDIDATES:
        path = candidate.format(arch=arch)
        if os.path.exists(path):
            return path
    return None


def _mapped_libraries() -> list:
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if line.split()[-1].startswith("/")})
    except OSError:
        return []


def on_reference_blas() -> bool:
    """True when this process's MLX computes on the CPU with the wheel's bundled reference BLAS."""
    if not sys.platform.startswith("linux"):
        return False
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return False
    libs = _mapped_libraries()
    bundled = any("mlx_cpu.libs" in p and "libblas" in os.path.basename(p) for p in libs)
    return bundled and not _system_blas(libs)


def _system_blas(libs: list) -> list:
    # an OpenBLAS or MKL that MLX's symbols can resolve to; numpy's wheel bundles a symbol-prefixed OpenBLAS
    # (scipy_openblas) that only numpy calls
    return [p for p in libs if any(k in os.path.basename(p).lower() for k in ("openblas", "mkl"))
            and "numpy.libs" not in p and "scipy_openblas" not in p]


def reexec_with_openblas(module: str, argv: list) -> None:
    """Replace this process by `python -m module argv` with OpenBLAS preloaded, when that helps; else return."""
    if os.environ.get(ENV) or not on_reference_blas():
        return
    path = find_openblas()
    if path is None:
        return
    env = dict(os.environ, **{ENV: "openblas"})
    env["LD_PRELOAD"] = " ".join(p for p in (path, os.environ.get("LD_PRELOAD")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def run_cli(module: str, main: Callable[[list], int]) -> int:
    """A command-line tool's entry point: re-execute with OpenBLAS where useful, run main, hint when it was not.
    Ctrl-C outside what main handles itself (while loading, or a second Ctrl-C) exits 130 with one line."""
    argv = sys.argv[1:]
    reexec_with_openblas(module, argv)
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    if status == 0 and not os.environ.get(ENV) and os.environ.get("MLX_RANK", "0") == "0" and on_reference_blas():
        print(HINT, file=sys.stderr)
    return status


def describe() -> str:
    """Which BLAS this process's MLX matmuls use, in one line."""
    import mlx.core as mx

    if not sys.platform.startswith("linux"):
        return "Accelerate (macOS)" if sys.platform == "darwin" else "the platform's own"
    if mx.default_device() != mx.cpu:
        return f"none needed: MLX computes on {mx.default_device()}"
    system = _system_blas(_mapped_libraries())
    if system:
        return f"{system[0]} (preloaded)"
    return "the mlx-cpu wheel's reference BLAS" if on_reference_blas() else "unknown"


def main(argv: list) -> int:
    """`python -m titans_mlx.blas`: print the BLAS a titans-mlx command would use here."""
    print(describe())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("titans_mlx.blas", main))
