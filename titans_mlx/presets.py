"""Model configs by name: the Titans paper's settings and laptop-sized ones, for every architecture.

    python -m titans_mlx.presets                      # list them
    python -m titans_mlx.presets mag-paper-170m       # print one as JSON (a --config for python -m titans_mlx.train)
    python -m titans_mlx.train --config preset:mag-laptop --data corpus.txt --out run

The paper's (v2 appendix E): memory chunk 16 with each chunk's gradients at the weights it starts from (batch 16),
MAC segments of 512 tokens with 256 long-term memory tokens, a sliding window of 2048 for MAG and MAL, 128
persistent tokens, a 2-layer MLP memory of expansion 4, the 170M block sizes of v2 table 5 (12 blocks, width 768,
16 heads) and Llama-2's 32K vocabulary. The laptop presets keep the shape at width 256 and a byte vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys

PAPER = dict(num_tokens=32000, dim=768, depth=12, heads=16, dim_head=48, num_persist_mem_tokens=128,
             neural_memory_segment_len=16, neural_memory_batch_size=16, num_residual_streams=1,
             neural_memory_model={"class": "MemoryMLP", "dim": 768, "depth": 2, "expansion_factor": 4.0})
LAPTOP = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, num_persist_mem_tokens=4,
              neural_memory_segment_len=16, neural_memory_batch_size=16, num_residual_streams=1,
              neural_memory_model={"class": "MemoryMLP", "dim": 256, "depth": 2, "expansion_factor": 2.0})

# per architecture: what differs from the shared settings, at paper scale and at laptop scale
ARCHITECTURES = {
    "mac": (dict(model_type="titans_mac", paper_order=True, segment_len=512, num_longterm_mem_tokens=256),
            dict(model_type="titans_mac", paper_order=True, segment_len=64, num_longterm_mem_tokens=4)),
    "mag": (dict(model_type="titans_mag", segment_len=2048), dict(model_type="titans_mag", segment_len=64)),
    "mal": (dict(model_type="titans_mal", segment_len=2048), dict(model_type="titans_mal", segment_len=64)),
    "lmm": (dict(model_type="titans_lmm", segment_len=2048, num_persist_mem_tokens=0),
            dict(model_type="titans_lmm", segment_len=64, num_persist_mem_tokens=0)),
    # the baseline of the paper's tables: sliding-window attention alone (a MAC without memory layers)
    "swa": (dict(model_type="titans_mac", segment_len=2048, sliding_window_attn=True, neural_memory_layers=[]),
            dict(model_type="titans_mac", segment_len=64, sliding_window_attn=True, neural_memory_layers=[])),
}

PRESETS = {}
for _name, (_paper, _laptop) in ARCHITECTURES.items():
    PRESETS[f"{_name}-paper-170m"] = dict(PAPER, **_paper)
    PRESETS[f"{_name}-laptop"] = dict(LAPTOP, **_laptop)


def preset(name: str) -> dict:
    """A copy of the named preset's config."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m titans_mlx.presets", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help="the preset to print as JSON (default: list them)")
    args = p.parse_args(argv)
    if args.name is None:
        for name, cfg in PRESETS.items():
            print(f"{name:18s} {cfg['model_type']}{' paper_order' if cfg.get('paper_order') else ''}, "
                  f"dim {cfg['dim']}, depth {cfg['depth']}, window {cfg['segment_len']}")
        return 0
    try:
        print(json.dumps(preset(args.name), indent=2))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
