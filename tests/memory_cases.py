"""Loading the committed titans-pytorch NeuralMemory fixtures into our module."""

import json

import mlx.core as mx
import numpy as np

from conftest import FIXTURES
from titans_mlx.memory import NeuralMemory

MEMORY_FIXTURES = FIXTURES / "memory"
CASE_NAMES = sorted(p.stem for p in MEMORY_FIXTURES.glob("*.npz"))


# the MLX side of the callables named in make_memory_fixtures.CALLABLES
CALLABLES = {
    "half_tanh": lambda t: 0.5 * (mx.tanh(t) + 1) * 0.3,
    "l1": lambda pred, target: mx.mean(mx.abs(pred - target), axis=-1),
}


def load_memory(case: dict) -> NeuralMemory:
    config = {k: CALLABLES.get(v, v) if isinstance(v, str) and k != "activation" else v
              for k, v in case["config"].items()}
    mem = NeuralMemory(**config)
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
