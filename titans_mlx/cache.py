"""Per-layer cache of the MAC transformer: attention keys/values of the visible window(s) + NeuralMemory state.

Like mlx-lm's caches, each object exposes ``state`` (a flat dict of arrays) and ``meta_state`` (a tuple of strings),
and ``from_state`` rebuilds it, so a whole cache (a list, one per layer) saves to one safetensors file.
"""

from __future__ import annotations

from typing import Optional

from .attention import AttentionCache


class MACLayerCache:
    def __init__(self):
        self.attention = AttentionCache()
        self.memory_state = None  # titans_mlx.memory.MemoryState, or None before the first call / without memory

    @property
    def offset(self) -> int:
        """Positions (tokens and long-term memory tokens) processed so far."""
        return self.attention.offset

    @property
    def state(self) -> dict:
        out = {}
        if self.attention.keys is not None:
            out["keys"], out["values"] = self.attention.keys, self.attention.values
        if self.memory_state is not None:
            for k, v in self.memory_state.to_dict().items():
                out[f"memory.{k}"] = v
        return out

    @property
    def meta_state(self) -> tuple:
        return (str(self.attention.offset),)

    @classmethod
    def from_state(cls, state: dict, meta_state: tuple) -> "MACLayerCache":
        cache = cls()
        try:
            cache.attention.offset = int(meta_state[0])
        except (IndexError, TypeError, ValueError):
            raise ValueError(f"not a MAC layer cache: meta_state {meta_state!r}") from None
        if ("keys" in state) != ("values" in state):
            raise ValueError("not a MAC layer cache: keys and values must be saved together")
        if "keys" in state:
            cache.attention.keys, cache.attention.values = state["keys"], state["values"]
        memory = {k[len("memory."):]: v for k, v in state.items() if k.startswith("memory.")}
        if memory:
            from .memory import MemoryState

            cache.memory_state = MemoryState.from_dict(memory)
        return cache

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.state.values())


def cache_to_arrays(cache: list) -> tuple[dict, dict]:
    """Flatten a list of layer caches to (arrays, metadata) for mx.save_safetensors."""
    arrays, meta = {}, {"num_layers": str(len(cache))}
    for i, c in enumerate(cache):
        for k, v in c.state.items():
            arrays[f"{i}.{k}"] = v
        meta[f"{i}.meta_state"] = ",".join(c.meta_state)
    return arrays, meta


def cache_from_arrays(arrays: dict, meta: dict) -> list:
    """Inverse of cache_to_arrays."""
    try:
        n = int(meta["num_layers"])
    except (KeyError, ValueError):
        raise ValueError("not a MAC cache: metadata lacks num_layers") from None
    layers = []
    for i in range(n):
        prefix = f"{i}."
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        meta_state: Optional[str] = meta.get(f"{i}.meta_state")
        if meta_state is None:
            raise ValueError(f"not a MAC cache: metadata lacks {i}.meta_state")
        layers.append(MACLayerCache.from_state(state, tuple(meta_state.split(","))))
    return layers
