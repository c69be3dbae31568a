"""The bundled model's training data: KJV text with retrieval samples mixed in, for ``python -m titans_mlx.train``.

    python demo/prepare_corpus.py --out demo/data            # demo/data/{train,val}.txt (KJV, every 20th chapter held out)
    python demo/make_recall_mixture.py --corpus demo/data --out demo/data/mixture --seq-len 1024

Writes OUT/train.jsonl and OUT/valid.jsonl (mlx-lm's formats) and OUT/mixture.json (what was made, and how):
- every training chapter as a ``{"text"}`` record (packed by the trainer, every byte a target);
- ``--retrieval-ratio`` retrieval samples per text window (default 2), each a ``{"prompt", "completion"}`` record of exactly
  seq_len + 1 tokens (the trainer never packs or cuts a record): passkey (Mohtashami & Jaggi's noise), S-NIAH-1
  with a haystack of *training* chapters and with RULER's noise, variable tracking and BABILong-lite stories in
  training chapters, from titans_mlx.recall_tasks, the generators the evaluation harness uses. The needle's depth is
  uniform in [0, 1], so its distance from the question spans the whole sample, most of it beyond the attention.
  The completion is the answer and a full stop; train with ``--prompt-loss-weight 0.1 --completion-loss-weight 10``
  so that five digits weigh about a seventh of a batch's loss, as in the titans-pytorch probe that learned passkeys.
- valid.jsonl: the held-out chapters as text only, so the validation loss is the bits/byte target's measure.

A warm-up stage in the setting of the titans-pytorch probe that learned passkeys (short samples, passkey only) is

    python demo/make_recall_mixture.py --out demo/data/passkey384 --seq-len 384 --min-len 256 \
        --tasks passkey --samples 20000 --no-text

``--min-len``: each record's length is drawn uniformly from [min-len, seq-len] (+1) instead of exactly seq-len + 1
(the trainer pads it); ``--tasks``: a subset of the tasks, their shares renormalised; ``--samples``: that many
retrieval samples instead of ``--retrieval-ratio`` per text window; ``--no-text``: no text records in train.jsonl.
The retrieval samples are one ``random.Random(--seed)`` stream; the harness seeds each prompt from a hash of (seed,
task, length, depth, index) (evaluate.sample_seed) and is run with held-out chapters as its haystack, so no
evaluation prompt is a training prompt.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from titans_mlx.recall_tasks import make_sample, sentences_of
from titans_mlx.tokenizer import ByteTokenizer

# the share of each task among the retrieval samples: the targets are passkey and S-NIAH in real text
TASK_SHARES = {"passkey": 0.40, "niah_kjv": 0.35, "niah_noise": 0.10, "vt": 0.05, "babilong": 0.10}
COMPLETION = {"passkey": " {}.", "niah": " {}.", "vt": " {}", "babilong": " {}."}


def chapters(text: str):
    return [c.strip("\n") for c in text.split("\n\n") if c.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="demo/data", help="prepare_corpus.py's output (train.txt, val.txt)")
    p.add_argument("--out", default="demo/data/mixture")
    p.add_argument("--seq-len", type=int, default=1024, help="the trainer's --seq-len (bytes)")
    p.add_argument("--retrieval-ratio", type=float, default=2.0,
                   help="retrieval samples per text window (default 2: two thirds of all samples)")
    p.add_argument("--min-len", type=int, default=None, help="shortest record (default: every record seq-len + 1)")
    p.add_argument("--tasks", default=",".join(TASK_SHARES), help=f"comma list of {', '.join(TASK_SHARES)}")
    p.add_argument("--samples", type=int, default=None, help="retrieval samples (default: --retrieval-ratio)")
    p.add_argument("--no-text", action="store_true", help="leave the training chapters out of train.jsonl")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    tasks = args.tasks.split(",")
    if not set(tasks) <= set(TASK_SHARES) or not tasks:
        p.error(f"--tasks: expected a comma list of {', '.join(TASK_SHARES)}")
    min_len = args.seq_len if args.min_len is None else args.min_len
    if not 0 < min_len <= args.seq_len:
        p.error("--min-len must lie in [1, --seq-len]")

    corpus, out = Path(args.corpus), Path(args.out)
    train_chapters = chapters((corpus / "train.txt").read_text())
    valid_chapters = chapters((corpus / "val.txt").read_text())
    tokenizer = ByteTokenizer()
    haystack = sentences_of("\n".join(train_chapters))
    text_bytes = sum(len(c.encode()) + 1 for c in train_chapters)
    n_retrieval = (int(text_bytes // args.seq_len * args.retrieval_ratio) if args.samples is None
                   else args.samples)
    rng = random.Random(args.seed)
    names, shares = zip(*((t, TASK_SHARES[t]) for t in tasks))
    counts = {name: 0 for name in names}
    records = [] if args.no_text else [{"text": c} for c in train_chapters]
    for _ in range(n_retrieval):
        name = rng.choices(names, shares)[0]
        length = args.seq_len if min_len == args.seq_len else rng.randint(min_len, args.seq_len)
        task = name.split("_")[0]
        completion = COMPLETION[task]
        # the answer is drawn inside make_sample: build with a placeholder-free length, then append the answer
        probe = rng.getstate()
        sample = make_sample(task, tokenizer, length, rng.random(), rng,
                             haystack if name in ("niah_kjv", "babilong") else None)
        tail = completion.format(sample.answer)
        # a record is exactly length + 1 tokens: redo it with room for the answer (same rng draws, so same answer)
        rng.setstate(probe)
        sample = make_sample(task, tokenizer, length + 1 - len(tail.encode()), rng.random(), rng,
                             haystack if name in ("niah_kjv", "babilong") else None)
        assert completion.format(sample.answer) == tail
        records.append({"prompt": tokenizer.decode(sample.ids), "completion": tail})
        counts[name] += 1
    rng.shuffle(records)  # the trainer permutes anyway; shuffled, the file reads as the mixture it is
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(out / "valid.jsonl", "w") as f:
        f.writelines(json.dumps({"text": c}) + "\n" for c in valid_chapters)
    summary = {"seq_len": args.seq_len, "min_len": min_len, "text": not args.no_text, "seed": args.seed,
               "train_chapters": len(train_chapters), "valid_chapters": len(valid_chapters),
               "train_text_bytes": text_bytes, "retrieval": counts,
               "task_shares": {n: round(w / sum(shares), 4) for n, w in zip(names, shares)}}
    (out / "mixture.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
