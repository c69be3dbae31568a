"""Titans (Learning to Memorize at Test Time) on Apple MLX, exact to titans-pytorch 0.5.5."""

from .cache import MACLayerCache, cache_from_arrays, cache_to_arrays
from .io import load, save_model
from .mac import Model, ModelArgs
from .memory import MemoryState, NeuralMemory
from .memory_models import (
    FactorizedMemoryMLP,
    GatedResidualMemoryMLP,
    MemoryAttention,
    MemoryMLP,
    MemorySwiGluMLP,
)
from .tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

MemoryAsContextTransformer = Model

__version__ = "0.1.0"
