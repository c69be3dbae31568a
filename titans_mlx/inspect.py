"""What a document wrote into the memory: ``python -m titans_mlx.inspect``.

    python -m titans_mlx.inspect --prompt-file book.txt --out book-memory
    python -m titans_mlx.inspect --prompt-file passage.txt --needle "The pass key is 71432." --depth 0.3

Reads the document through the model in prefill blocks (as ``titans_mlx.generate`` does, so memory stays flat) and
records, per token and per memory layer and head, the surprise (the store loss of the token before its chunk is
written: NeuralMemory's ``return_surprises``) and the learned step size, and per chunk the forget gate, the norm of
the update and the norm of the memory's weights after it. Writes ``memory.html`` (one self-contained page: the text
coloured by surprise, a strip chart along the document), ``memory.png`` (the same curves, matplotlib) and
``memory.json`` (the numbers); see titans_mlx.inspect_page for the first two.

With ``--needle`` the sentence is planted at ``--depth`` (a fraction of the document, at a sentence boundary) and a
question about it ends the prompt; the page then marks the needle and shows the model's answer with the memory
learning and frozen (``titans_mlx.memory_frozen``), and how much the memory's read at the question moves when the
needle's number is changed (learning, and frozen as the control).

Which token a surprise belongs to: without ``store_with_lookahead_value`` a token's key is trained on its own value,
so the store loss is that token's. With it, the key of one token is trained on the value of the next, and the loss
is given to the next token, the one the memory failed to predict (the first token of every chunk then has none).
Long-term memory tokens are written too; their losses are not drawn (they are not text).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np

FORMATS = ("html", "png", "json")
DEFAULT_QUESTION = "What is the pass key? The pass key is"
DEFAULT_OUT = "memory_inspect"


class InspectError(Exception):
    """A bad input or an unusable model: reported as one line, ``error: ...``."""


# ---- recording -------------------------------------------------------------------------------------------------------


@dataclass
class LayerTrace:
    """One memory layer along the document. Per token arrays are (heads, tokens), NaN where the memory stored no
    loss for the token; per chunk arrays are (heads, chunks), chunk_end the tokens read when each chunk was written."""

    layer: int  # 1-based, as neural_memory_layers counts
    heads: int
    surprise: np.ndarray
    step_size: np.ndarray
    chunk_end: np.ndarray
    forget: np.ndarray
    update_norm: np.ndarray
    weight_norm: np.ndarray
    read_last: Optional[np.ndarray] = None  # (dim,) what the memory read at the last token
    # the first token of the first chunk whose numbers are not finite (the memory's inner descent diverged), or None
    diverged_at: Optional[int] = None


@dataclass
class Trace:
    token_ids: List[int]
    layers: List[LayerTrace]
    chunk_size: int
    lookahead: bool
    last_logits: Optional[mx.array] = None
    cache: list = field(default_factory=list)


def token_of_position(model, n_tokens: int) -> np.ndarray:
    """For each position the MAC runs on (tokens and interleaved long-term memory tokens), its token's index in the
    document, or -1 for a long-term memory token."""
    pos = np.arange(model.positions_for(n_tokens))
    full, rest = np.divmod(pos, model.window)
    is_token = rest < model.segment_len
    return np.where(is_token, full * model.segment_len + np.minimum(rest, model.segment_len), -1)


def memory_layers(model) -> List[int]:
    return [i + 1 for i, layer in enumerate(model.layers) if layer.has_memory]


def read_document(model, token_ids: List[int], layers: List[int], block: int, progress=None) -> Trace:
    """Run the document through the model in blocks of `block` tokens with a cache, recording what each memory layer
    in `layers` wrote. The model's forward never evaluates; we evaluate once per block, as generate's prefill does."""
    n = len(token_ids)
    to_token = token_of_position(model, n)
    mems = {layer: model.layers[layer - 1].mem for layer in layers}
    structure = next(iter(mems.values())).structure
    C = mems[layers[0]].chunk_size
    # per layer: sums of the losses and of the step sizes given to each token, and how many (keys per token)
    per_token = {layer: [np.zeros((mems[layer].heads, n)) for _ in range(3)] for layer in layers}
    per_chunk = {layer: [] for layer in layers}
    diverged = {layer: None for layer in layers}
    cache, done, last_logits, reads = model.make_cache(), 0, None, {}
    progress = progress or (lambda done, total: None)
    progress(0, n)
    while done < n:
        k = min(block - done % block, n - done)
        logits, records = model(mx.array(token_ids[done:done + k], dtype=mx.int32)[None], cache=cache,
                                return_memory=True)
        wanted = {layer: records[layer - 1] for layer in layers}
        last_logits = logits[0, -1]
        for layer, rec in wanted.items():
            reads[layer] = rec["retrieved"][0, -1]
        arrays = {layer: {key: v for key, v in rec.items() if key not in ("first_chunk", "retrieved")}
                  for layer, rec in wanted.items()}
        mx.eval(last_logits, arrays, reads, [c.state for c in cache])
        for layer, rec in wanted.items():
            mem, got = mems[layer], {key: np.array(v[0].astype(mx.float32)) for key, v in arrays[layer].items()}
            chunks = got["forget"].shape[-1]
            if chunks:
                _place_losses(per_token[layer], got["surprises"], got["step_sizes"], rec["first_chunk"], chunks, C,
                              mem.structure.num_kv_per_token, mem.structure.lookahead, to_token)
                ends = (rec["first_chunk"] + 1 + np.arange(chunks)) * C
                per_chunk[layer].append((np.array([model._tokens_before(int(e)) for e in ends]), got["forget"],
                                         got["update_norm"], got["weight_norm"]))
                if diverged[layer] is None:
                    bad = np.zeros(chunks, bool)
                    for key, v in got.items():
                        bad |= ~np.isfinite(v.reshape(v.shape[0], chunks, -1)).all(axis=(0, 2))
                    if bad.any():
                        diverged[layer] = model._tokens_before(int((rec["first_chunk"] + np.argmax(bad)) * C))
        done += k
        progress(done, n)
        mx.clear_cache()

    traces = []
    for layer in layers:
        s_sum, lr_sum, count = per_token[layer]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            surprise = np.where(count > 0, s_sum / count, np.nan).astype(np.float32)
            step = np.where(count > 0, lr_sum / count, np.nan).astype(np.float32)
        heads = mems[layer].heads
        parts = per_chunk[layer]
        cat = lambda i: (np.concatenate([p[i] for p in parts], axis=-1) if parts else
                         np.zeros((heads, 0), np.float32))
        chunk_end = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        read = reads.get(layer)
        traces.append(LayerTrace(layer, heads, surprise, step, chunk_end, cat(1), cat(2), cat(3),
                                 None if read is None else np.array(read.astype(mx.float32)), diverged[layer]))
    return Trace(list(token_ids), traces, C, structure.lookahead, last_logits, cache)


def _place_losses(acc, losses, lrs, first_chunk, chunks, C, u, lookahead, to_token):
    """Give each stored key's loss and step size (heads, chunks * per_chunk) to a token (see the module's docstring).

    Within a chunk the keys are the C positions' u keys each, in order; with lookahead the last key is dropped and
    key j is trained on value j + 1, so its loss belongs to the position of value j + 1."""
    per_chunk = losses.shape[-1] // chunks
    j = np.arange(per_chunk) + (1 if lookahead else 0)
    positions = ((first_chunk + np.arange(chunks))[:, None] * C + j[None, :] // u).reshape(-1)
    tokens = to_token[positions]
    keep = tokens >= 0
    for h in range(losses.shape[0]):
        np.add.at(acc[0][h], tokens[keep], losses[h][keep])
        np.add.at(acc[1][h], tokens[keep], lrs[h][keep])
        np.add.at(acc[2][h], tokens[keep], 1)


def greedy(model, trace: Trace, steps: int) -> List[int]:
    """The model's greedy continuation of what `trace` read (its cache goes on; the caller decides frozen or not)."""
    out, logits = [], trace.last_logits
    for _ in range(steps):
        token = int(mx.argmax(logits).item())
        out.append(token)
        logits = model(mx.array([[token]], dtype=mx.int32), cache=trace.cache)[0, -1]
    return out


def token_texts(tokenizer, token_ids: List[int]) -> List[str]:
    """What each token adds to the decoded text, by the tokenizer's streaming detokenizer: a character split over
    several tokens (bytes of one UTF-8 character) belongs to the token that completes it; the texts join to the
    decoded document whatever the tokenizer."""
    detok = tokenizer.detokenizer
    detok.reset()
    texts = []
    for t in token_ids:
        detok.add_token(t)
        texts.append(detok.last_segment)
    detok.finalize()
    if texts:
        texts[-1] += detok.last_segment
    return texts


# ---- the needle ------------------------------------------------------------------------------------------------------


def plant(document: str, needle: str, depth: float):
    """(document with the needle inserted at a sentence boundary near `depth` of its length, the needle's offset)."""
    target = round(depth * len(document))
    ends = [0, len(document)] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+|\n+", document)]
    at = min(ends, key=lambda e: abs(e - target))
    if abs(at - target) > max(200, len(document) // 20):  # no sentence near: a space will do
        spaces = [m.end() for m in re.finditer(r"\s+", document)]
        at = min(spaces + [at], key=lambda e: abs(e - target))
    before, after = document[:at], document[at:]
    if before and not before[-1].isspace():
        before += " "
    if after and not after[0].isspace():
        after = " " + after
    return before + needle + after, len(before)


def changed_number(needle: str) -> str:
    """The needle with every digit of its numbers changed (d -> d + 5 mod 10): same length, another pass key."""
    return re.sub(r"\d", lambda m: str((int(m.group()) + 5) % 10), needle)


def with_question(text: str, question: str) -> str:
    return text + ("" if not text or text[-1].isspace() else "\n") + question


def needle_tokens(texts: List[str], needle: str, near: int):
    """[first, last) token indices covering the needle's text (the occurrence nearest char `near`), or None."""
    decoded = "".join(texts)
    hits = [m.start() for m in re.finditer(re.escape(needle), decoded)]
    if not hits:
        return None
    a = min(hits, key=lambda h: abs(h - near))
    b = a + len(needle)
    ends = np.cumsum([len(t) for t in texts])
    starts = ends - np.array([len(t) for t in texts])
    inside = np.nonzero((ends > a) & (starts < b))[0]
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else None


# ---- command line ----------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like argparse without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m titans_mlx.inspect",
                description="Draw what a document wrote into a Titans model's neural memory.")
    p.add_argument("--model", default=None, help="Model directory. Default: the bundled demo model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="The document's text")
    src.add_argument("--prompt-file", default=None, help="The document, a UTF-8 text file")
    p.add_argument("--layers", default=None, help="Memory layers to record, 1-based, comma-separated (default: all)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"Output directory (default: {DEFAULT_OUT})")
    p.add_argument("--format", default=None,
                   help="Comma-separated: html, png, json (default: all three; png only when matplotlib is there)")
    p.add_argument("--needle", default=None, help="A sentence holding a number to plant, e.g. 'The pass key is 71432.'")
    p.add_argument("--depth", type=float, default=None, help="Where to plant the needle, 0..1 of the document (0.3)")
    p.add_argument("--question", default=DEFAULT_QUESTION,
                   help=f"Ends the prompt in needle mode ({DEFAULT_QUESTION!r})")
    p.add_argument("--answer-tokens", type=int, default=8, help="Greedy tokens generated at the question (8)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="Tokens per block (2048)")
    return p


def _read_document(args) -> tuple:
    if args.prompt is not None:
        return args.prompt.replace("\\n", "\n").replace("\\t", "\t"), "--prompt"
    from .generate import GenerationError, read_text_file

    try:
        return read_text_file(args.prompt_file), Path(args.prompt_file).name
    except GenerationError as e:
        raise InspectError(str(e)) from None


def _load_model(path_arg):
    from .generate import DEFAULT_MODEL
    from .io import load
    from .mac import Model

    path = Path(path_arg) if path_arg is not None else DEFAULT_MODEL
    if not path.is_dir():
        raise InspectError(f"model directory {path} does not exist" if not path.exists() else
                           f"{path} is not a model directory")
    try:
        model, tokenizer = load(path)
    except PermissionError as e:
        raise InspectError(f"cannot read model directory {path}: {e.strerror}") from None
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InspectError(f"cannot load model from {path}: {msg}") from None
    if not isinstance(model, Model):
        raise InspectError(f"{path} holds a {type(model).__name__}, not a MAC transformer; inspect reads a document "
                           "through a whole model")
    if tokenizer is None:
        raise InspectError(f"model directory {path} has no tokenizer (tokenizer.json or tokenizer.model)")
    if not memory_layers(model):
        raise InspectError(f"the model in {path} has no neural memory layers (neural_memory_layers is empty): "
                           "nothing to inspect")
    return model, tokenizer, path


def _parse_formats(value):
    if value is None:
        return None
    formats = [f.strip().lower() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InspectError(f"--format {value!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def _parse_layers(value, model) -> List[int]:
    have = memory_layers(model)
    if value is None:
        return have
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InspectError(f"--layers {value!r}: expected layer numbers like 2,3") from None
    missing = [layer for layer in layers if layer not in have]
    if missing or not layers:
        raise InspectError(f"--layers {value!r}: the model's memory layers are {','.join(map(str, have))} (1-based)")
    return list(dict.fromkeys(layers))


def _check_args(args):
    if args.needle is None and args.depth is not None:
        raise InspectError("--depth places a --needle; give the needle too")
    if args.needle is not None:
        if not re.search(r"\d", args.needle):
            raise InspectError(f"--needle {args.needle!r} holds no number: plant a pass key like "
                               "'The pass key is 71432.'")
        depth = 0.3 if args.depth is None else args.depth
        if not 0 <= depth <= 1:
            raise InspectError(f"--depth must be in [0, 1] (a fraction of the document), got {args.depth}")
        args.depth = depth
    if args.answer_tokens < 0:
        raise InspectError(f"--answer-tokens must be >= 0, got {args.answer_tokens}")
    if args.prefill_step_size < 1:
        raise InspectError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out} exists and is not a directory")


def _png_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _progress(desc: str, block: int):
    """A tqdm bar on stderr while a document longer than one block is read."""
    bar = None

    def callback(done, total):
        nonlocal bar
        if bar is None and total > block and 0 < done < total:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tok", desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        if bar is not None:
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    return callback


def _write_atomic(path: Path, data: bytes):
    # a temporary file in the same directory, renamed over the target: never a half-written output
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _relative_change(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[float]:
    if a is None or b is None:
        return None
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def run_needle(model, tokenizer, document, args, layers, block):
    """Plant the needle, read the prompt with the memory learning (recorded) and frozen, and a control prompt whose
    pass key differs. Returns (trace of the learning run, its token ids, the needle summary)."""
    from .memory import memory_frozen

    planted, at = plant(document, args.needle, args.depth)
    prompt = with_question(planted, args.question)
    control_needle = changed_number(args.needle)
    control = with_question(planted[:at] + control_needle + planted[at + len(args.needle):], args.question)
    ids, control_ids = tokenizer.encode(prompt), tokenizer.encode(control)

    trace = read_document(model, ids, layers, block, _progress("reading (memory learning)", block))
    answer = greedy(model, trace, args.answer_tokens)
    with memory_frozen(model):
        frozen = read_document(model, ids, layers, block, _progress("reading (memory frozen)", block))
        frozen_answer = greedy(model, frozen, args.answer_tokens)
        frozen_control = read_document(model, control_ids, layers, block, _progress("control (frozen)", block))
    learning_control = read_document(model, control_ids, layers, block, _progress("control (learning)", block))
    del frozen.cache, frozen_control.cache, learning_control.cache

    texts = token_texts(tokenizer, ids)
    span = needle_tokens(texts, args.needle, at)
    number = re.findall(r"\d+", args.needle)[-1]
    decode = lambda t: tokenizer.decode(t)
    summary = {
        "needle": args.needle, "depth": args.depth, "question": args.question, "pass_key": number,
        "control_needle": control_needle, "tokens": None if span is None else list(span),
        "same_length_control": len(ids) == len(control_ids),
        "answer_learning": decode(answer), "answer_frozen": decode(frozen_answer),
        "answer_learning_ids": answer, "answer_frozen_ids": frozen_answer,
        "recalled_learning": number in decode(answer), "recalled_frozen": number in decode(frozen_answer),
        "layers": [],
    }
    for tr, fr, lc, fc in zip(trace.layers, frozen.layers, learning_control.layers, frozen_control.layers):
        entry = {"layer": tr.layer,
                 # how far the memory's read at the question's last token moves when only the pass key changes
                 "read_change_learning": _relative_change(tr.read_last, lc.read_last),
                 "read_change_frozen": _relative_change(fr.read_last, fc.read_last),
                 "surprise_needle": None, "surprise_rest": None, "step_needle": None, "step_rest": None}
        if span is not None:
            inside = np.zeros(len(ids), bool)
            inside[span[0]:span[1]] = True
            for name, values in (("surprise", tr.surprise), ("step", tr.step_size)):
                a, b = values[:, inside], values[:, ~inside]
                entry[f"{name}_needle"] = [_nanmean(row) for row in a]
                entry[f"{name}_rest"] = [_nanmean(row) for row in b]
        summary["layers"].append(entry)
    return trace, ids, texts, summary


def _nanmean(row) -> Optional[float]:
    row = row[~np.isnan(row)]
    return float(row.mean()) if row.size else None


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        formats = _parse_formats(args.format)
        if formats is not None and "png" in formats and not _png_available():
            raise InspectError("--format png needs matplotlib (pip install matplotlib), or leave png out")
        if formats is None:
            formats = [f for f in FORMATS if f != "png" or _png_available()]
            if "png" not in formats:
                print("note: matplotlib is not installed, so no PNG (pip install matplotlib)", file=sys.stderr)
        _check_args(args)
        document, name = _read_document(args)
        if not document:
            raise InspectError("the document is empty")
        model, tokenizer, model_path = _load_model(args.model)
        layers = _parse_layers(args.layers, model)
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from .generate import _block_size
    from . import inspect_page

    block = _block_size(model, args.prefill_step_size)
    needle = None
    try:
        if args.needle is not None:
            trace, ids, texts, needle = run_needle(model, tokenizer, document, args, layers, block)
        else:
            ids = tokenizer.encode(document)
            if not ids:
                raise InspectError("the document encodes to no tokens")
            trace = read_document(model, ids, layers, block, _progress("reading", block))
            texts = token_texts(tokenizer, ids)
        shown = args.model if args.model is not None else "the bundled demo model (titans_mlx/demo_model)"
        report = inspect_page.report(trace, texts, model, model_path=shown, document=name, needle=needle)
        outputs = {}
        if "json" in formats:
            outputs["memory.json"] = inspect_page.render_json(report)
        if "html" in formats:
            outputs["memory.html"] = inspect_page.render_html(report)
        if "png" in formats:
            outputs["memory.png"] = inspect_page.render_png(report)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for file, data in outputs.items():
            _write_atomic(out / file, data)
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1

    print(f"{len(ids):,} tokens, memory layers {','.join(map(str, layers))}: " +
          ", ".join(str(Path(args.out) / f) for f in outputs))
    if needle is not None:
        print(inspect_page.needle_line(needle))
    return 0


if __name__ == "__main__":
    from .blas import run_cli

    sys.exit(run_cli("titans_mlx.inspect", main))
