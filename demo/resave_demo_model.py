"""Rewrite the bundled demo model (titans_mlx/demo_model) with the current `save_model`: its config, tokenizer and
mlx-lm files as save_model writes them now, the weights unchanged (checked), the model card kept.

    python demo/resave_demo_model.py
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from titans_mlx.io import load, load_config, save_model  # noqa: E402

DEMO = ROOT / "titans_mlx" / "demo_model"
CARD = "README.md"  # not written by save_model, which replaces the whole directory


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def main():
    before = weights(DEMO)
    card = (DEMO / CARD).read_text()
    model, tokenizer = load(DEMO)
    save_model(DEMO, model, load_config(DEMO), tokenizer, overwrite=True)
    (DEMO / CARD).write_text(card)
    after = weights(DEMO)
    if before.keys() != after.keys() or any(not np.array_equal(before[k], after[k]) for k in before):
        sys.exit(f"{DEMO}: the weights changed on re-saving")
    print(f"Rewrote {DEMO}: {', '.join(sorted(p.name for p in DEMO.iterdir()))}")


if __name__ == "__main__":
    main()
