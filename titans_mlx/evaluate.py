"""Does the model recall what it read? ``python -m titans_mlx.evaluate``.

    python -m titans_mlx.evaluate --tasks passkey --lengths 1024,2048,4096 --samples 4 --ablation frozen-memory
    python -m titans_mlx.evaluate --model DIR --tasks passkey,niah,vt,babilong --haystack book.txt --out eval-book

Builds seeded recall prompts in the model's own tokens (titans_mlx.recall_tasks: passkey, RULER's niah and
variable tracking, bAbI-style stories), reads each through the model as ``titans_mlx.generate`` does (segment-aligned
prefill blocks, flat memory), decodes greedily and scores the continuation: exact match of the answer, per-digit
accuracy for numbers, the chance rate beside each. Every sample records how far its needed facts are from the end of
the prompt and whether attention alone could still carry them there (``attention_sees``): the report separates those
from the facts only the memory can carry. ``--ablation frozen-memory`` reads the same prompts again with test-time
learning off (``titans_mlx.memory_frozen``): a recall that survives freezing did not come from the memory.

Writes under ``--out``: ``results.json`` (the settings and every sample), ``results.md`` (the tables) and
``heatmap_<task>.png`` (exact match by length and depth; matplotlib), each written whole or not at all; prints the
tables. Library: ``evaluate(model, tokenizer, ...)`` returns the same results; ``score`` and ``attention_sees`` are
the scoring and the reach rule.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .recall_tasks import TASKS, VT_NAME_LEN, Sample, TaskError, make_sample, sentences_of

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 5
ABLATIONS = ("frozen-memory",)
LEARNING = "learning"  # the condition without ablation
# babilong's haystack when none is given: the repository's demo passage (repeated as needed)
DEMO_HAYSTACK = Path(__file__).resolve().parent.parent / "demo" / "passages" / "genesis_20.txt"
HAYSTACK_TASKS = ("niah", "babilong")


class EvalError(Exception):
    """A bad input or an unusable model: reported as one line, ``error: ...``."""


# ---- what attention can see ------------------------------------------------------------------------------------------


def token_position(model, token: int) -> int:
    """The position (long-term memory tokens counted) at which the MAC runs a document's token."""
    return (token // model.segment_len) * model.window + token % model.segment_len


def attention_reach(model) -> Optional[int]:
    """How many positions back attention alone can carry a token to the last layer's output, or None for block
    attention (it carries nothing across a window's edge).

    The rule: with sliding windows a layer's query at position q sees the keys at q - W .. q (W = model.window, the
    segment plus its long-term tokens; the mask is ``q - k <= W``), and stacked layers relay what they saw, so
    ``depth`` layers reach depth * W positions back. Without sliding windows each window of positions attends only
    within itself, however deep the stack. Persistent memory tokens are the same for every text, and the residual
    streams and value residual mix only a position with itself, so nothing else carries text across positions: the
    rest is the neural memory's doing."""
    attns = [layer.attn for layer in model.layers if "attn" in layer]
    if not attns:  # the memory alone (titans_lmm): attention carries nothing
        return 0
    if not all(attn.sliding for attn in attns):
        return None
    return len(attns) * model.window


def attention_sees(model, query_token: int, key_token: int) -> bool:
    """Whether attention alone can bring the document's token `key_token` into the output at `query_token` (see
    attention_reach). Exact in tokens: positions are computed, not estimated."""
    q, k = token_position(model, query_token), token_position(model, key_token)
    if k > q:
        return False
    reach = attention_reach(model)
    if reach is None:
        return q // model.window == k // model.window
    return q - k <= reach


def classify(model, sample: Sample) -> str:
    """"attention" when attention could bring every fact the answer needs to the prompt's last token (the first
    answer token is predicted there, and later answer tokens are farther away), else "memory": some needed fact
    lies entirely out of attention's reach, and only the memory can carry it. Judged on each fact's last token, so a
    fact counts as visible if any of it is."""
    last = sample.length - 1
    return "attention" if all(attention_sees(model, last, end - 1) for _, end in sample.needles) else "memory"


# ---- samples, answers, scores ----------------------------------------------------------------------------------------


def sample_seed(seed: int, task: str, length: int, depth: float, index: int) -> int:
    """The seed of one sample, from the run's seed and the sample's place in the grid: a sample can be rebuilt
    alone (``make_sample(task, tokenizer, length, depth, random.Random(sample_seed(...)))``) and adding a length or a
    depth does not change the others."""
    key = f"{seed}/{task}/{length}/{float(depth)!r}/{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def make_samples(tokenizer, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int,
                 seed: int = 0, haystack: Optional[Sequence[str]] = None) -> List[tuple]:
    """Every (sample seed, Sample) of the grid, built before anything runs (so a bad length is refused at once).
    haystack: sentences for niah (else its noise) and babilong (else demo_haystack()); babilong cycles qa1, qa2,
    qa3 over each cell's samples."""
    import random

    if "babilong" in tasks and haystack is None:
        babilong_haystack = demo_haystack()
    out = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for i in range(samples):
                    s = sample_seed(seed, task, length, depth, i)
                    kw = {"qa": i % 3 + 1} if task == "babilong" else {}
                    hay = haystack if task in HAYSTACK_TASKS else None
                    if task == "babilong" and haystack is None:
                        hay = babilong_haystack
                    out.append((s, make_sample(task, tokenizer, length, depth, random.Random(s), hay, **kw)))
    return out


def score(kind: str, expected: str, output: str) -> dict:
    """Score a continuation against the expected answer.

    number: the first run of digits in the output, exact match and per-digit accuracy (position by position from
    the first digit; missing digits are wrong); word: the output's first word, case-insensitive; names (vt): the
    first len(expected) five-letter capitalised names must be exactly the expected ones (any order); ``recall`` is
    the fraction of expected names anywhere in the output (RULER's measure)."""
    result = {"answer": "", "correct": False, "digit_accuracy": None, "recall": None}
    if kind == "number":
        m = re.search(r"\d+", output)
        got = m.group() if m else ""
        result.update(answer=got, correct=got == expected,
                      digit_accuracy=sum(a == b for a, b in zip(got, expected)) / len(expected))
    elif kind == "word":
        m = re.search(r"[A-Za-z]+", output)
        got = m.group().lower() if m else ""
        result.update(answer=got, correct=got == expected.lower())
    elif kind == "names":
        want = expected.split()
        found = re.findall(rf"\b[A-Z]{{{VT_NAME_LEN}}}\b", output)
        got = found[: len(want)]
        result.update(answer=" ".join(got), correct=sorted(got) == sorted(want),
                      recall=len(set(found) & set(want)) / len(want))
    else:
        raise ValueError(f"unknown answer kind {kind!r}")
    return result


def greedy_answer(model, tokenizer, ids: List[int], max_tokens: int, frozen: bool = False, state=None,
                  prefill_step_size: int = 2048) -> str:
    """The model's greedy continuation of the prompt `ids` (`max_tokens` tokens at most, fewer at an EOS), read as
    titans_mlx.generate reads a prompt; with `frozen` the memories read but never write (titans_mlx.memory_frozen).
    `state`: a GenerationState to fill (a fresh one by default), so a caller can look at the memory afterwards."""
    from .generate import stream_generate
    from .memory import memory_frozen
    from .session import GenerationState

    state = state if state is not None else GenerationState.new(model)
    with memory_frozen(model) if frozen else nullcontext():
        return "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens, state=state,
                                                       prefill_step_size=prefill_step_size))


def evaluate(model, tokenizer, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = DEFAULT_LENGTHS,
             depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES, seed: int = 0,
             haystack: Optional[Sequence[str]] = None, ablation: Optional[str] = None,
             answer_fn: Optional[Callable[[List[int], int, bool], str]] = None, progress=None,
             prefill_step_size: int = 2048, items: Optional[List[tuple]] = None) -> dict:
    """Run the grid; returns {"config", "samples", "summary"} (what results.json holds).

    haystack: sentences (``recall_tasks.sentences_of(text)``) for niah and babilong; babilong needs it.
    ablation: None or "frozen-memory" (each prompt is then read twice, learning and frozen).
    answer_fn(ids, max_tokens, frozen) -> text: how a prompt is answered (default: greedy_answer on the model).
    progress: called once per answered prompt; items: the grid's samples when already made (make_samples with
    the same arguments). Raises TaskError for a grid that cannot be built.
    """
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r} (expected one of {', '.join(ABLATIONS)})")
    if items is None:
        items = make_samples(tokenizer, tasks, lengths, depths, samples, seed, haystack)
    if answer_fn is None:
        answer_fn = lambda ids, n, frozen: greedy_answer(model, tokenizer, ids, n, frozen,
                                                         prefill_step_size=prefill_step_size)
    conditions = [LEARNING] + ([ablation] if ablation else [])
    records, tic = [], time.perf_counter()
    for index, (s_seed, s) in enumerate(items):
        reach = classify(model, s)
        distances = [s.question_start - end for _, end in s.needles]
        for condition in conditions:
            output = answer_fn(s.ids, s.max_new_tokens, condition != LEARNING)
            result = score(s.kind, s.answer, output)
            records.append({
                "task": s.task, "variant": s.variant, "seed": s_seed, "length": s.length, "depth": s.depth,
                "needle_depth": s.needle_depth, "needle_tokens": [list(span) for span in s.needles],
                "question_start": s.question_start,
                # tokens between the end of the farthest fact the answer needs and the question
                "distance": max(distances), "distances": distances, "reach": reach,
                "expected": s.answer, "output": output, "answer": result["answer"], "correct": result["correct"],
                "digit_accuracy": result["digit_accuracy"], "recall": result["recall"], "chance": s.chance,
                "digit_chance": s.digit_chance, "ablation": None if condition == LEARNING else condition,
            })
            if progress is not None:
                progress()
    config = {
        "tasks": list(tasks), "lengths": list(lengths), "depths": [float(d) for d in depths], "samples": samples,
        "seed": seed, "ablation": ablation, "conditions": conditions,
        "attention_reach_positions": attention_reach(model) if hasattr(model, "window") else None,
        "window": getattr(model, "window", None), "segment_len": getattr(model, "segment_len", None),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return {"config": config, "samples": records, "summary": summarize(records, tasks, lengths, depths, conditions)}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: List[dict], tasks, lengths, depths, conditions) -> dict:
    """Per task and condition: the length x depth grid of exact matches, and attention-visible vs memory-only."""
    out = {}
    for task in tasks:
        mine = [r for r in records if r["task"] == task]
        entry = {"chance": _mean(r["chance"] for r in mine), "digit_chance": _mean(r["digit_chance"] for r in mine)}
        for condition in conditions:
            ab = None if condition == LEARNING else condition
            rs = [r for r in mine if r["ablation"] == ab]
            grid = {}
            for length in lengths:
                for depth in depths:
                    cell = [r for r in rs if r["length"] == length and r["depth"] == float(depth)]
                    grid[f"{length}/{float(depth)}"] = [sum(r["correct"] for r in cell), len(cell)]
            by_reach = {}
            for reach in ("attention", "memory"):
                cell = [r for r in rs if r["reach"] == reach]
                by_reach[reach] = {"n": len(cell), "correct": sum(r["correct"] for r in cell),
                                   "digit_accuracy": _mean(r["digit_accuracy"] for r in cell),
                                   "recall": _mean(r["recall"] for r in cell)}
            entry[condition] = {"grid": grid, "by_reach": by_reach, "correct": sum(r["correct"] for r in rs),
                                "n": len(rs), "digit_accuracy": _mean(r["digit_accuracy"] for r in rs)}
        out[task] = entry
    return out


# ---- reports ---------------------------------------------------------------------------------------------------------


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None:
        return "-"
    if 0 < x < 10 ** -digits:
        return f"{x:.0e}"
    return f"{x:.{digits}f}"


def _grid_rows(results: dict, task: str) -> List[List[str]]:
    cfg, summary = results["config"], results["summary"][task]
    rows = [["length \\ depth", *[f"{d:g}" for d in cfg["depths"]]]]
    for length in cfg["lengths"]:
        row = [f"{length:,}"]
        for depth in cfg["depths"]:
            cells = [summary[c]["grid"][f"{length}/{float(depth)}"] for c in cfg["conditions"]]
            row.append(" · ".join(f"{k}/{n}" for k, n in cells))
        rows.append(row)
    return rows


def _reach_rows(results: dict, task: str) -> List[List[str]]:
    cfg, summary = results["config"], results["summary"][task]
    partial = "per digit" if summary["digit_chance"] is not None else ("names" if task == "vt" else None)
    head = ["needed facts", "samples"]
    for c in cfg["conditions"]:
        head += [f"exact ({c})"] + ([f"{partial} ({c})"] if partial else [])
    head += ["chance"] + ([f"chance {partial}"] if partial else [])
    rows = [head]
    for reach, label in (("attention", "attention can see them"), ("memory", "only the memory can carry them")):
        n = summary[cfg["conditions"][0]]["by_reach"][reach]["n"]
        row = [label, str(n)]
        for c in cfg["conditions"]:
            b = summary[c]["by_reach"][reach]
            row.append(f"{b['correct']}/{b['n']}" + (f" = {b['correct'] / b['n']:.2f}" if b["n"] else ""))
            if partial:
                row.append(_fmt(b["digit_accuracy"] if partial == "per digit" else b["recall"]))
        row.append(_fmt(summary["chance"], 5) if summary["chance"] else "0")
        if partial:
            row.append(_fmt(summary["digit_chance"]) if partial == "per digit" else "0")
        rows.append(row)
    return rows


def _caption(results: dict) -> str:
    cfg = results["config"]
    conds = " · ".join(cfg["conditions"])
    return (f"exact matches of {cfg['samples']} sample(s) per cell" +
            (f" ({conds})" if len(cfg["conditions"]) > 1 else ""))


def _text_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def _md_table(rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]])


def _reach_note(results: dict) -> str:
    cfg = results["config"]
    reach = cfg["attention_reach_positions"]
    if reach is None:
        return (f"attention covers one window of {cfg['window']} positions ({cfg['segment_len']} tokens and the "
                "long-term tokens); facts outside the question's window need the memory")
    return (f"attention reaches {reach} positions back (layers x window of {cfg['window']}, about "
            f"{reach * cfg['segment_len'] // cfg['window']} tokens); facts farther from the prompt's end need the "
            "memory")


def render_text(results: dict) -> str:
    parts = []
    for task in results["config"]["tasks"]:
        parts.append(f"{task}: {_caption(results)}\n{_text_table(_grid_rows(results, task))}\n\n"
                     f"{_text_table(_reach_rows(results, task))}")
    return "\n\n".join(parts) + f"\n\n({_reach_note(results)})\n"


def render_markdown(results: dict, model_name: str = "the model") -> str:
    cfg = results["config"]
    lines = [f"# Recall of {model_name}", "",
             f"`python -m titans_mlx.evaluate`: seed {cfg['seed']}, {cfg['samples']} sample(s) per length and depth, "
             f"greedy decoding; {_reach_note(results)}."]
    for task in cfg["tasks"]:
        lines += ["", f"## {task}", "", f"Rows: prompt length in tokens; columns: depth of the first needed fact; "
                  f"cells: {_caption(results)}.", "", _md_table(_grid_rows(results, task)), "",
                  _md_table(_reach_rows(results, task))]
    return "\n".join(lines) + "\n"


def render_heatmap(results: dict, task: str) -> bytes:
    """PNG: exact-match rate by length (rows) and depth (columns), one panel per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg, summary = results["config"], results["summary"][task]
    conditions = cfg["conditions"]
    fig, axes = plt.subplots(1, len(conditions), figsize=(0.9 * len(cfg["depths"]) * len(conditions) + 2.4,
                                                          0.45 * len(cfg["lengths"]) + 1.9),
                             squeeze=False, constrained_layout=True)
    for n_ax, (ax, condition) in enumerate(zip(axes[0], conditions)):
        grid = summary[condition]["grid"]
        cells = [[grid[f"{length}/{float(d)}"] for d in cfg["depths"]] for length in cfg["lengths"]]
        rate = np.array([[k / n if n else np.nan for k, n in row] for row in cells])
        im = ax.imshow(rate, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(cells):
            for j, (k, n) in enumerate(row):
                ax.text(j, i, f"{k}/{n}", ha="center", va="center", fontsize=8,
                        color="black" if n and k / n > 0.6 else "white")
        ax.set_xticks(range(len(cfg["depths"])), [f"{d:g}" for d in cfg["depths"]])
        ax.set_yticks(range(len(cfg["lengths"])), [f"{n:,}" for n in cfg["lengths"]])
        ax.set_xlabel("depth of the needle")
        if n_ax == 0:
            ax.set_ylabel("length (tokens)")
        ax.set_title(f"{task}, memory {condition.replace('-memory', '')}", fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), label="exact match", shrink=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ---- command line ----------------------------------------------------------------------------------------------------


def setup_arg_parser():
    from .generate import _Parser

    p = _Parser(prog="python -m titans_mlx.evaluate",
                description="Measure a Titans model's recall: passkey, RULER's niah and variable tracking, bAbI-style "
                            "stories, at chosen lengths and depths.")
    p.add_argument("--model", default=None, help="Model directory. Default: the bundled demo model")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated: {', '.join(TASKS)} (default: all)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="Prompt lengths in the model's tokens, comma-separated (4k = 4096)")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="Where the needle sits, fractions of the haystack (0: its start, 1: just before the question)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"Samples per length and depth ({DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="Seed of every prompt (0)")
    p.add_argument("--haystack", default=None, help="A UTF-8 text to hide niah's and babilong's facts in (default: "
                   "niah the noise sentences, babilong demo/passages/genesis_20.txt)")
    p.add_argument("--ablation", default=None, help="frozen-memory: also read every prompt with test-time learning off")
    p.add_argument("--out", default=None, help="Output directory (default: eval-<model directory name>)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="Prompt tokens per block (2048)")
    return p


def _parse_list(value: str, what: str, convert, example: str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise EvalError(f"--{what} {value!r}: expected a comma-separated list like {example}")
    out = []
    for item in items:
        try:
            out.append(convert(item))
        except ValueError:
            raise EvalError(f"--{what} {value!r}: {item!r} is not valid; expected a list like {example}") from None
    return list(dict.fromkeys(out))


def _length(item: str) -> int:
    m = re.fullmatch(r"(\d+)([kK]?)", item)
    if not m:
        raise ValueError(item)
    n = int(m.group(1)) * (1024 if m.group(2) else 1)
    if n < 1:
        raise ValueError(item)
    return n


def _depth(item: str) -> float:
    d = float(item)
    if not 0 <= d <= 1:
        raise ValueError(item)
    return d


def _check_args(args):
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"--tasks {args.tasks!r}: unknown task {unknown[0]!r}; expected some of {', '.join(TASKS)}"
                        if unknown else f"--tasks {args.tasks!r}: name at least one of {', '.join(TASKS)}")
    args.tasks = list(dict.fromkeys(tasks))
    args.lengths = _parse_list(args.lengths, "lengths", _length, "1024,2048,4k")
    args.depths = _parse_list(args.depths, "depths", _depth, "0,0.25,0.5,0.75,1 (each in [0, 1])")
    if args.samples < 1:
        raise EvalError(f"--samples must be >= 1, got {args.samples}")
    if args.ablation is not None and args.ablation not in ABLATIONS:
        raise EvalError(f"--ablation {args.ablation!r}: expected {' or '.join(ABLATIONS)}")
    if args.prefill_step_size < 1:
        raise EvalError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")


def demo_haystack() -> List[str]:
    """babilong's default haystack: the sentences of the repository's demo passage (Genesis 20, KJV)."""
    from .generate import GenerationError, read_text_file

    if not DEMO_HAYSTACK.is_file():
        raise TaskError(f"babilong needs a haystack text: give --haystack FILE (the demo passage {DEMO_HAYSTACK} is "
                        "not there)")
    try:
        return sentences_of(read_text_file(DEMO_HAYSTACK))
    except GenerationError as e:
        raise TaskError(str(e).replace("prompt file", "haystack file", 1)) from None


def _read_haystack(args) -> Optional[List[str]]:
    from .generate import GenerationError, read_text_file

    if args.haystack is None:
        return None
    try:
        text = read_text_file(args.haystack)
    except GenerationError as e:
        raise EvalError(str(e).replace("prompt file", "haystack file", 1)) from None
    sentences = sentences_of(text)
    if not sentences:
        raise EvalError(f"haystack file {args.haystack} has no text")
    return sentences


def _load_model(path_arg):
    from .generate import DEFAULT_MODEL, GenerationError, _load_model as load_model
    from .mac import Model

    try:
        model, tokenizer = load_model(path_arg)
    except GenerationError as e:
        raise EvalError(str(e)) from None
    path = Path(path_arg) if path_arg is not None else DEFAULT_MODEL
    if not isinstance(model, Model):
        raise EvalError(f"{path} holds a {type(model).__name__}, not a MAC transformer: there is no language model "
                        "to ask")
    return model, tokenizer, path


def _png_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        _check_args(args)
        haystack = _read_haystack(args)
        model, tokenizer, model_path = _load_model(args.model)
        out = Path(args.out) if args.out is not None else Path(f"eval-{model_path.resolve().name}")
        if out.exists() and not out.is_dir():
            raise EvalError(f"--out {out} exists and is not a directory")
        if args.ablation and not any(getattr(layer, "has_memory", False) for layer in model.layers):
            raise EvalError(f"the model in {model_path} has no neural memory layers: --ablation {args.ablation} would "
                            "change nothing")
        try:  # every prompt is built (and checked) before the first is read
            items = make_samples(tokenizer, args.tasks, args.lengths, args.depths, args.samples, args.seed, haystack)
        except TaskError as e:
            raise EvalError(str(e)) from None
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from tqdm import tqdm

    runs = len(args.tasks) * len(args.lengths) * len(args.depths) * args.samples * (2 if args.ablation else 1)
    bar = tqdm(total=runs, unit="prompt", desc="evaluating", file=sys.stderr, dynamic_ncols=True)
    try:
        results = evaluate(model, tokenizer, args.tasks, args.lengths, args.depths, args.samples, args.seed,
                           haystack, args.ablation, progress=lambda: bar.update(1),
                           prefill_step_size=args.prefill_step_size, items=items)
    except KeyboardInterrupt:
        bar.close()
        print("\n[interrupted] (nothing written)", file=sys.stderr)
        return 130
    bar.close()
    shown = args.model if args.model is not None else "the bundled demo model"
    results["config"].update(model=str(model_path), haystack=args.haystack,
                             babilong_haystack=args.haystack or (str(DEMO_HAYSTACK) if "babilong" in args.tasks
                                                                 else None))
    files = {"results.json": (json.dumps(results, indent=1) + "\n").encode(),
             "results.md": render_markdown(results, shown).encode()}
    if _png_available():
        for task in args.tasks:
            files[f"heatmap_{task}.png"] = render_heatmap(results, task)
    else:
        print("note: matplotlib is not installed, so no heatmaps (pip install matplotlib)", file=sys.stderr)
    from .inspect import _write_atomic as write_atomic  # temp file then rename, as inspect writes its page

    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(out / name, data)
    except OSError as e:
        print(f"error: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(render_text(results))
    print(f"{len(results['samples'])} answers in {results['config']['seconds']:.0f} s: " +
          ", ".join(str(out / name) for name in files))
    return 0


if __name__ == "__main__":
    from .blas import run_cli

    sys.exit(run_cli("titans_mlx.evaluate", main))
