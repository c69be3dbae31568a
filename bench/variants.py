"""The paper's Table 1/2 in miniature: MAC (paper order), MAG, MAL, LMM and a sliding-window transformer of the same
width, depth and window, each trained by ``python -m titans_mlx.train`` with the same budget, data, seed and schedule,
then compared on validation bits/byte and ``python -m titans_mlx.evaluate``'s passkey and S-NIAH grids (with the
frozen-memory control). Run from the repository root:

    python demo/prepare_corpus.py --out demo/data          # the KJV corpus (apt-get install bible-kjv)
    python -m bench.variants --data demo/data/train.txt --iters 200
    python -m bench.variants --archs mag,swa --size laptop --iters 1000   # the *-laptop presets instead

Writes OUT/NAME.json and OUT/NAME.md (default bench/results/variants.*), with every command it ran; the runs and
evaluations go under --work (not committed). Nothing here picks a winner: the table is what was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bench import env as E

ARCHS = {"mac": "MAC (paper order)", "mag": "MAG", "mal": "MAL", "lmm": "LMM", "swa": "SWA transformer",
         "mac_pytorch": "MAC (titans-pytorch order)"}
# an architecture with other NeuralMemory settings: (architecture, neural_memory_kwargs). *_lr01: the memory's step
# size theta_t = 0.1 * sigmoid(.) (titans-pytorch's train_mac.py) instead of the default 1 * sigmoid(.)
SETTINGS = {f"{a}_lr01": (a, {"default_step_transform_max_lr": 0.1}) for a in ("mac", "mag", "mal", "lmm")}
ARCHS.update({name: f"{ARCHS[a]}, step size <= 0.1" for name, (a, _) in SETTINGS.items()})

# CPU-sized: width 128, 2 blocks, window/segment 64, memory chunks of 16 with the paper's chunk-start gradients
TINY = dict(num_tokens=256, dim=128, depth=2, heads=4, dim_head=32, num_persist_mem_tokens=4,
            neural_memory_segment_len=16, neural_memory_batch_size=16, num_residual_streams=1,
            neural_memory_model={"class": "MemoryMLP", "dim": 128, "depth": 2, "expansion_factor": 2.0})
TINY_ARCHS = {
    "mac": dict(model_type="titans_mac", paper_order=True, segment_len=64, num_longterm_mem_tokens=4),
    "mag": dict(model_type="titans_mag", segment_len=64),
    "mal": dict(model_type="titans_mal", segment_len=64),
    "lmm": dict(model_type="titans_lmm", segment_len=64, num_persist_mem_tokens=0),
    "swa": dict(model_type="titans_mac", segment_len=64, sliding_window_attn=True, neural_memory_layers=[]),
    "mac_pytorch": dict(model_type="titans_mac", segment_len=64, num_longterm_mem_tokens=4),
}


def config_for(arch: str, size: str) -> dict:
    if arch in SETTINGS:
        base, kwargs = SETTINGS[arch]
        cfg = config_for(base, size)
        return dict(cfg, neural_memory_kwargs=dict(cfg.get("neural_memory_kwargs", {}), **kwargs))
    if size == "tiny":
        return dict(TINY, **TINY_ARCHS[arch])
    from titans_mlx.presets import preset

    if arch == "mac_pytorch":
        return dict(preset(f"mac-{size}"), paper_order=False)
    return preset(f"{arch}-{size}")


def _run(cmd: list, log: Path, reuse: bool) -> tuple:
    """(seconds, the command's one-line error or None); with reuse, what an earlier run of it left in `log`."""
    timing = log.with_suffix(".seconds")
    if not (reuse and timing.exists()):
        print("[bench] " + " ".join(cmd), file=sys.stderr, flush=True)
        tic = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=E.ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        timing.write_text(json.dumps({"seconds": time.perf_counter() - tic, "rc": rc}))
    done = json.loads(timing.read_text())
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    return done["seconds"], (errors[-1] if errors else f"exit status {done['rc']}") if done["rc"] else None


def _val_bits_per_byte(run: Path) -> tuple:
    # byte tokenizer: one token per byte, so nats/token / ln 2 = bits/byte
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_loss" in r]
    first, last = val[0], val[-1]
    return first["val_loss"] / math.log(2), last["val_loss"] / math.log(2), last["step"]


def _params(run: Path) -> int:
    import mlx.core as mx

    return sum(v.size for v in mx.load(str(run / "model.safetensors")).values())


def _cell(summary: dict, task: str, condition: str) -> str:
    # exact matches, and the share of the answer's digits right (chance 0.1)
    entry = summary[task].get(condition)
    if entry is None:
        return "-"
    digits = entry["digit_accuracy"]
    return f"{entry['correct']}/{entry['n']} · {'-' if digits is None else f'{digits:.2f}'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="mac,mag,mal,lmm,swa", help=f"comma list of {', '.join(ARCHS)}")
    p.add_argument("--size", default="tiny", help="tiny (built in, CPU minutes), laptop or paper-170m (presets)")
    p.add_argument("--data", default="demo/data/train.txt")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="passkey,niah")
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--work", default="demo/runs/variants", help="runs and evaluations (git-ignored)")
    p.add_argument("--out", default=str(E.ROOT / "bench" / "results"))
    p.add_argument("--name", default="variants")
    p.add_argument("--reuse", action="store_true", help="keep the runs and evaluations already in --work")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        print(f"error: --archs: unknown {bad or args.archs!r}; choose from {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    work = Path(args.work)
    (work / "configs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows, commands = [], []
    for arch in archs:
        cfg_file = work / "configs" / f"{arch}.json"
        cfg_file.write_text(json.dumps(config_for(arch, args.size), indent=1) + "\n")
        run, ev = work / "runs" / arch, work / "evals" / arch
        run.parent.mkdir(parents=True, exist_ok=True)
        train = [py, "-m", "titans_mlx.train", "--config", str(cfg_file), "--data", args.data, "--out", str(run),
                 "--iters", str(args.iters), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                 "--learning-rate", str(args.learning_rate), "--warmup", str(args.warmup),
                 "--val-batches", str(args.val_batches), "--steps-per-eval", str(args.iters),
                 "--steps-per-report", "10", "--save-every", "0", "--seed", str(args.seed), "--force"]
        train_s, failed = _run(train, work / f"train_{arch}.log", args.reuse)
        commands.append(" ".join(train[1:]))
        row = {"arch": arch, "name": ARCHS[arch], "config": json.loads(cfg_file.read_text()),
               "train_seconds": round(train_s)}
        if failed:  # e.g. a diverged run: reported as measured, not dropped
            rows.append(dict(row, error=failed))
            _write(args, argv, commands, rows)
            continue
        evaluate = [py, "-m", "titans_mlx.evaluate", "--model", str(run), "--tasks", args.tasks, "--lengths",
                    args.lengths, "--depths", args.depths, "--samples", str(args.samples), "--seed", str(args.seed),
                    "--out", str(ev)]
        if config_for(arch, args.size).get("neural_memory_layers") != []:  # freezing a model without memory: a no-op
            evaluate[-2:-2] = ["--ablation", "frozen-memory"]
        eval_s, failed = _run(evaluate, work / f"eval_{arch}.log", args.reuse)
        if failed:
            print(f"error: {' '.join(evaluate)}: {failed}", file=sys.stderr)
            return 1
        commands.append(" ".join(evaluate[1:]))
        before, after, step = _val_bits_per_byte(run)
        results = json.loads((ev / "results.json").read_text())
        rows.append(dict(row, params=_params(run), val_bits_per_byte_init=before, val_bits_per_byte=after, steps=step,
                         eval_seconds=round(eval_s), summary=results["summary"],
                         attention_reach_positions=results["config"]["attention_reach_positions"]))
        _write(args, argv, commands, rows)  # after every model: a run cut short keeps what it measured
    print(render(json.loads((Path(args.out) / f"{args.name}.json").read_text())))
    return 0


def _write(args, argv, commands, rows) -> None:
    doc = {"benchmark": "variants", "environment": E.environment(sys.argv if argv is None else argv),
           "settings": vars(args), "commands": commands, "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(render(doc))


def render(doc: dict) -> str:
    s = doc["settings"]
    tasks = s["tasks"].split(",")
    tokens = s["iters"] * s["batch_size"] * s["seq_len"]
    lines = [
        "# The paper's architectures at one budget", "",
        f"Each model: `python -m titans_mlx.train` for {s['iters']} steps of {s['batch_size']} x {s['seq_len']} "
        f"tokens ({tokens:,} tokens, bytes of `{s['data']}`, the last 5% held out), AdamW at {s['learning_rate']} "
        f"with {s['warmup']} warm-up steps and cosine decay, seed {s['seed']}; validation bits/byte over "
        f"{s['val_batches']} held-out batches at the end. Recall: `python -m titans_mlx.evaluate`, "
        f"{', '.join(tasks)} at lengths {s['lengths']} and depths {s['depths']}, {s['samples']} samples per cell, "
        "cells: exact matches · share of digits right (chance 0.10), with test-time learning on (learning) and off "
        "(frozen memory; none for SWA, which has no memory).", "",
        "| model | params | val bits/byte (init -> end) | " +
        " | ".join(f"{t} learning | {t} frozen" for t in tasks) + " | attention reach | train s |",
        "|---|---|---|" + "---|---|" * len(tasks) + "---|---|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | | training stopped: {r['error'].removeprefix('error: ')} |" +
                         " |" * (2 * len(tasks) + 1) + f" {r['train_seconds']} |")
            continue
        cells = " | ".join(f"{_cell(r['summary'], t, 'learning')} | {_cell(r['summary'], t, 'frozen-memory')}"
                           for t in tasks)
        reach = r["attention_reach_positions"]
        lines.append(f"| {r['name']} | {r['params']:,} | {r['val_bits_per_byte_init']:.3f} -> "
                     f"{r['val_bits_per_byte']:.3f} | {cells} | {'block' if reach is None else reach} | "
                     f"{r['train_seconds']} |")
    lines += ["", "Train seconds are wall time on the machine below, shared with other jobs: not a speed comparison. "
              "One seed each; the spread between seeds was not measured. A run that stopped is shown as it stopped "
              "(its error line): nothing is re-tried with other settings under the same name."]
    lines += ["", "Configs (the same width, depth, heads and window; SWA is a MAC without memory layers):", ""]
    for r in doc["results"]:
        lines.append(f"- {r['name']}: `{json.dumps(r['config'], separators=(',', ':'))}`")
    env = doc["environment"]
    lines += ["", "Commands (from the repository root):", "", "```",
              *[f"python {c}" for c in doc["commands"]], "```", "",
              f"Environment: {json.dumps(env, separators=(',', ':'))[:600]}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
