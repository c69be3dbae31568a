"""Build the demo model's corpus: the King James Bible (public domain) from Debian's `bible-kjv-text`.

Offline source: Debian packages `bible-kjv` (reader, GPL-2+) and `bible-kjv-text` (the text; "the copyright for the
King James Version text of the Bible is expired", see /usr/share/doc/bible-kjv-text/copyright).

    apt-get install -y bible-kjv            # pulls bible-kjv-text
    python demo/prepare_corpus.py --out demo/data

Writes train.txt and val.txt (UTF-8/ASCII). Each chapter becomes "Book N" followed by one verse per line; every 20th
chapter goes to the validation split (held out, same distribution).
"""

import argparse
import os
import re
import subprocess


def chapters(raw: str):
    """Yield (title, [verse, ...]) from `bible` output (hard-wrapped, verses numbered)."""
    title, verses = None, []
    for line in raw.splitlines():
        s = line.strip()
        if not s:
            continue
        m = re.match(r"^(\d+) (.*)$", s)
        if line.startswith("  ") and m:  # a new verse
            verses.append(m.group(2))
        elif not line.startswith(" ") and re.match(r"^[1-3]? ?[A-Z][A-Za-z ]+ \d+$", s):
            if title is not None:
                yield title, verses
            title, verses = s, []
        else:  # continuation of a wrapped verse
            verses[-1] += " " + s
    if title is not None:
        yield title, verses


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    p.add_argument("--val-every", type=int, default=20)
    args = p.parse_args()
    raw = subprocess.run(["bible", "-l1000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    os.makedirs(args.out, exist_ok=True)
    train, val = [], []
    for i, (title, verses) in enumerate(chapters(raw)):
        text = title + "\n" + "\n".join(verses) + "\n\n"
        (val if i % args.val_every == args.val_every - 1 else train).append(text)
    for name, parts in (("train.txt", train), ("val.txt", val)):
        with open(os.path.join(args.out, name), "w", encoding="ascii") as f:
            f.write("".join(parts))
    print(f"chapters: {len(train)} train, {len(val)} val; bytes: {sum(map(len, train))} train, {sum(map(len, val))} val")


if __name__ == "__main__":
    main()
