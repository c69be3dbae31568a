"""Data parallel training on mx.distributed: two local processes (ring backend over 127.0.0.1) against one.

The test starts both ranks itself with MLX_RANK and MLX_HOSTFILE (not mlx.launch, which exits 0 even when ranks
fail), so each rank's exit status is checked.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


from test_train import files, global_relative_difference, saved_step  # noqa: F401  (files is a fixture)
from titans_mlx.train import main

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--seq-len", "32", "--val-batches", "1", "--steps-per-eval", "2", "--steps-per-report", "1",
         "--learning-rate", "1e-4", "--warmup", "1"]


def _free_ports(n: int):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_two(files, tmp_path: Path, *extra, timeout=240):
    hostfile = tmp_path / f"hosts-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    argv = [sys.executable, "-m", "titans_mlx.train", "--config", str(files / "mac.json"), "--data",
            str(files / "corpus.txt"), *FLAGS, *map(str, extra)]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)})
             for rank in (0, 1)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    hostfile.unlink()
    return results


def test_two_processes_equal_one_process_with_the_same_global_batch(files, tmp_path):  # noqa: F811
    out = tmp_path / "two"
    # 2 steps, then every rank resumes from the checkpoint rank 0 wrote, to 4 steps
    for extra in (["--iters", 2], ["--iters", 4, "--resume"]):
        results = run_two(files, tmp_path, "--batch-size", 4, "--out", out, *extra)
        for rank, (rc, stdout, stderr) in enumerate(results):
            assert rc == 0, f"rank {rank} exited {rc}: {stderr[-2000:]}"
        assert "Val loss" in results[0][1] and results[1][1] == ""  # rank 0 alone reports (and writes)
    assert saved_step(out) == 4
    # The same global batch of 4 on one process. The gradients agree to float32 rounding (batches of 2 and of 4
    # round differently), which Adam's first steps can turn into a move of about lr either way on a weight whose
    # gradient is that small: so a small learning rate and the weights compared as one vector, as test_train's
    # accumulation test; a run on other samples differs by > 1e-3 there.
    one = tmp_path / "one"
    assert main(["--config", str(files / "mac.json"), "--data", str(files / "corpus.txt"), *FLAGS, "--out", str(one),
                 "--iters", "4", "--batch-size", "4"]) == 0
    assert global_relative_difference(out, one) <= 1e-5
    losses = lambda d: [r["train_loss"] for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())
                        if "train_loss" in r]
    assert len(losses(out)) == 4 and max(abs(a - b) for a, b in zip(losses(out), losses(one))) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no staging directories left


def test_a_batch_that_does_not_split_stops_every_rank(files, tmp_path):  # noqa: F811
    results = run_two(files, tmp_path, "--batch-size", 3, "--iters", 2, "--out", tmp_path / "o")
    for rc, _, stderr in results:
        assert rc == 1 and stderr.strip() == "error: --batch-size 3 does not split across 2 processes"
    assert not (tmp_path / "o").exists()
