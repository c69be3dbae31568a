"""The CLIs' BLAS choice (titans_mlx/blas.py): re-executed with an installed OpenBLAS, a one-line hint without one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from titans_mlx import blas

ROOT = Path(__file__).resolve().parents[1]
linux_cpu = pytest.mark.skipif(not blas.on_reference_blas(), reason="MLX here is not the mlx-cpu wheel on Linux")


def _run(module, *args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("TITANS_MLX_BLAS", "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, "PYTHONPATH": str(ROOT), **env}, timeout=120)


@linux_cpu
@pytest.mark.skipif(blas.find_openblas() is None, reason="no system OpenBLAS installed (libopenblas0-pthread)")
def test_a_cli_reexecutes_itself_with_the_installed_openblas():
    r = _run("titans_mlx.blas")
    assert r.returncode == 0 and "openblas" in r.stdout.lower() and "(preloaded)" in r.stdout, r
    assert r.stderr == ""
    kept = _run("titans_mlx.blas", TITANS_MLX_BLAS="stock")
    assert kept.stdout.strip() == "the mlx-cpu wheel's reference BLAS" and kept.stderr == ""


@linux_cpu
def test_without_openblas_a_successful_run_ends_with_one_hint(monkeypatch, capsys):
    monkeypatch.delenv("TITANS_MLX_BLAS")
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    monkeypatch.setattr(sys, "argv", ["prog", "--x"])
    seen = []
    assert blas.run_cli("titans_mlx.blas", lambda argv: seen.append(argv) or 0) == 0
    assert seen == [["--x"]] and capsys.readouterr().err.splitlines() == [blas.HINT]
    assert blas.run_cli("titans_mlx.blas", lambda argv: 1) == 1  # a failed run prints only its own error
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TITANS_MLX_BLAS", "stock")
    assert blas.run_cli("titans_mlx.blas", lambda argv: 0) == 0 and capsys.readouterr().err == ""
