"""Titans (Learning to Memorize at Test Time) on Apple MLX, exact to titans-pytorch 0.5.5."""

from .io import load, save_model
from .mac import Model, ModelArgs
from .memory import MemoryState, NeuralMemory, memory_frozen
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


def __getattr__(name):
    # imported on first use: importing titans_mlx.generate here would make `python -m titans_mlx.generate` warn
    # that the module was already loaded; the functions also replace the submodule of the same name
    if name in ("generate", "stream_generate"):
        import importlib

        module = importlib.import_module(".generate", __name__)
        globals().update(generate=module.generate, stream_generate=module.stream_generate)
        return globals()[name]
    raise AttributeError(f"module 'titans_mlx' has no attribute {name!r}")
