"""Loading the committed titans-pytorch NeuralMemory fixtures into our module."""

import json

import mlx.core as mx
import numpy as np

from conftest import FIXTURES
from titans_mlx.memory import NeuralMemory

MEMORY_FIXTURES = FIXTURES / "memory"
CASE_NAMES = sorted(p.stem for p in MEMORY_FIXTURES.glob("*.npz"))


def load_memory(case: dict) -> NeuralMemory:
    mem = NeuralMemory(**case["config"])
    mem.load_weights(list(mem.sanitize(case["sd"]).items()), strict=True)
    return mem


def from_arrays(arrays) -> dict:
    case = {"config": json.loads(str(arrays["config"])), "sd": {}, "prev": [], "last_update": []}
    for key in list(arrays.keys()):
        value = arrays[key]
        if key.startswith("sd."):
            case["sd"][key[3:]] = mx.array(value)
        elif key.startswith(("prev.", "last_update.")):
            group, i = key.split(".")
            case[group].append((int(i), mx.array(value)))
        elif key != "config":
            case[key] = mx.array(value)
    for group in ("prev", "last_update"):
        case[group] = [v for _, v in sorted(case[group])] or None
    return case


def load_case(name: str) -> dict:
    return from_arrays(np.load(MEMORY_FIXTURES / f"{name}.npz"))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
