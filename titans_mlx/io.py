"""Model directories: `config.json`, `model.safetensors` (or shards + index, as mlx-lm), a tokenizer and, for
mlx-lm's loader, `titans_model.py` (see MLX_LM_MODEL_FILE).

    model, tokenizer = load("path/to/model")        # strict: every weight present, nothing left over
    save_model("path/to/out", model, config, tokenizer)
"""

import dataclasses
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .tokenizer import SPM_FILE, TOKENIZER_JSON, load_tokenizer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # as mlx-lm
# mlx-lm's load_model runs `config["model_file"]` from the directory (with trust_remote_code) for model types it does
# not know; ours only imports the package's classes. We never run it: `load` builds from model_type.
MLX_LM_MODEL_FILE = "titans_model.py"
# what save_model adds to config.json for mlx-lm; not model arguments (ModelArgs.from_dict drops them)
MLX_LM_CONFIG_KEYS = ("model_file", "eos_token_id")
# mlx-lm's record of how the weights are packed (`quantize_model`): kept through config completion, read by `load`
QUANTIZATION_KEYS = ("quantization", "quantization_config")


def _build_mac(config: dict) -> nn.Module:
    from .mac import Model, ModelArgs

    return Model(ModelArgs.from_dict(config))


def _complete_mac(config: dict) -> dict:
    from .mac import ModelArgs

    full = dataclasses.asdict(ModelArgs.from_dict(config))
    if full.get("neural_memory_layers") is not None:
        full["neural_memory_layers"] = list(full["neural_memory_layers"])
    return full


def _memory_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "model_type" and k not in QUANTIZATION_KEYS}


def _build_memory(config: dict) -> nn.Module:
    from .memory import NeuralMemory

    return NeuralMemory(**_memory_kwargs(config))


def _complete_memory(config: dict) -> dict:
    from .memory import NeuralMemory

    full = {}
    for name, p in inspect.signature(NeuralMemory).parameters.items():
        if p.default is not inspect.Parameter.empty:
            full[name] = p.default
    full.update(_memory_kwargs(config))
    full["model_type"] = "titans_neural_memory"
    return full


@dataclasses.dataclass(frozen=True)
class ModelType:
    """How to build a model of one `model_type` and how to write its full config.

    `mlx_lm_module`: the module with the `Model` and `ModelArgs` mlx-lm should build (see `MLX_LM_MODEL_FILE`),
    or None where mlx-lm has no use for the model. `block`: for a language model (titans_mlx.mac.Model), the block
    class its layers are, given its ModelArgs; None for other models.
    """

    build: Callable[[dict], nn.Module]
    complete: Callable[[dict], dict]
    mlx_lm_module: Optional[str] = None
    block: Optional[Callable[[object], type]] = None


def _mac_block(args):
    from .mac import MACLayer
    from .variants import PaperMACLayer

    return PaperMACLayer if args.paper_order else MACLayer


def _variant_block(name: str):
    def block(args):
        from . import variants

        return getattr(variants, name)

    return block


# every model type, in one place; the language models share titans_mlx.mac.Model and differ in their block
MODEL_TYPES: Dict[str, ModelType] = {
    "titans_mac": ModelType(_build_mac, _complete_mac, "titans_mlx.mac", _mac_block),
    "titans_mag": ModelType(_build_mac, _complete_mac, "titans_mlx.mac", _variant_block("MAGBlock")),
    "titans_mal": ModelType(_build_mac, _complete_mac, "titans_mlx.mac", _variant_block("MALBlock")),
    "titans_lmm": ModelType(_build_mac, _complete_mac, "titans_mlx.mac", _variant_block("LMMBlock")),
    "titans_neural_memory": ModelType(_build_memory, _complete_memory),
}


def language_model_types() -> list:
    """The model types built as titans_mlx.mac.Model (token ids in, logits out): what train/generate/evaluate run."""
    return [name for name, kind in MODEL_TYPES.items() if kind.block is not None]


def block_class(args) -> type:
    """The block class the layers of a language model with these ModelArgs are."""
    return MODEL_TYPES[args.model_type].block(args)


def model_type_of(config: dict) -> ModelType:
    name = config.get("model_type")
    if name not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {name!r}; expected one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[name]


def build_model(config: dict) -> nn.Module:
    """Instantiate (randomly initialised) the model a config describes."""
    return model_type_of(config).build(config)


def complete_config(config: dict) -> dict:
    """The config with every default filled in: what `config.json` holds."""
    full = model_type_of(config).complete(config)
    full.update({k: config[k] for k in QUANTIZATION_KEYS if k in config})
    return full


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    raise ValueError(f"config value {value!r} cannot be written to config.json")


def check_weights(model: nn.Module, weights: Dict[str, mx.array], source: str = "checkpoint") -> None:
    """Raise ValueError naming the first missing, unexpected or wrongly shaped weight."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source} lacks weight {missing[0]}{more} that the config needs")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{source} has weight {unexpected[0]}{more} that the config does not create")
    for key in sorted(expected):
        have, want = tuple(weights[key].shape), tuple(expected[key].shape)
        if have != want:
            raise ValueError(f"weight {key}: {source} has shape {have}, the config gives {want}")


def _write_weights(path: Path, weights: Dict[str, mx.array], max_shard_bytes: int) -> None:
    # mlx_lm.utils.make_shards/save_model do this too, but in whole GiB (max_file_size_gb << 30) and always with an
    # index; ours takes a size in bytes (the tests shard small models) and writes an index only for shards
    shards, shard, size = [], {}, 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if shard and size + nbytes > max_shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[key] = weights[key]
        size += nbytes
    shards.append(shard)
    metadata = {"format": "mlx"}
    if len(shards) == 1:
        mx.save_safetensors(str(path / "model.safetensors"), shards[0], metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {
        "metadata": {
            "total_size": sum(v.nbytes for v in weights.values()),
            "total_parameters": sum(v.size for v in weights.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=4) + "\n")


def is_model_dir(path) -> bool:
    """True for an empty directory or one holding a config.json: what `overwrite` may replace."""
    # --force only ever replaces what looks like one of our outputs, never an arbitrary directory
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    return not entries or (path / CONFIG_FILE).is_file()


def save_model(
    path,
    model: nn.Module,
    config: dict,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a model directory atomically: it appears complete or not at all.

    A model mlx-lm can run (titans_mac) also gets `titans_model.py`, named by config.json's `model_file`, and the
    tokenizer's EOS id as config.json's `eos_token_id`: what `mlx_lm.load(..., trust_remote_code=True)` reads.

    Args:
        path: the directory to create.
        model: the model whose parameters are saved.
        config: its config (completed with defaults and written sorted to `config.json`).
        tokenizer: a tokenizer with a `save(dir)` method, or None.
        overwrite: replace an existing model directory at `path`. Default: ``False``.
        max_shard_bytes: split weights into shards of at most this size (a single tensor larger
            than this gets a shard of its own). Default: 5 GiB.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False, or it is not a model directory.
        ValueError: a float64 weight (safetensors files from MLX hold at most 32-bit floats).
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (use --force / overwrite=True to replace it)")
        if not is_model_dir(path):
            raise FileExistsError(f"{path} exists and is not a model directory; refusing to replace it")
    kind = model_type_of(config)
    full = _jsonable(complete_config(config))
    if kind.mlx_lm_module is not None:
        full["model_file"] = MLX_LM_MODEL_FILE
        if getattr(tokenizer, "eos_token_id", None) is not None:
            # mlx-lm stops on it (a byte tokenizer's EOS reaches mlx-lm no other way, see ByteTokenizer.save)
            full["eos_token_id"] = tokenizer.eos_token_id
    weights = dict(tree_flatten(model.parameters()))
    wide = sorted(k for k, v in weights.items() if v.dtype == mx.float64)
    if wide:  # MLX's safetensors writer has no float64
        raise ValueError(f"weight {wide[0]} is float64, which a model directory cannot hold; cast the model first "
                         "(model.set_dtype(mx.float32))")
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        _write_weights(tmp, weights, max_shard_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(full, indent=4, sort_keys=True) + "\n")
        if kind.mlx_lm_module is not None:
            (tmp / MLX_LM_MODEL_FILE).write_text(_mlx_lm_model_file(config["model_type"], kind.mlx_lm_module))
        if tokenizer is not None:
            tokenizer.save(tmp)
        os.chmod(tmp, 0o755 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.replace(path, old / "dir")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _mlx_lm_model_file(model_type: str, module: str) -> str:
    return f'''"""mlx-lm's entry point for this {model_type} model directory, written by titans_mlx.io.save_model.

config.json names this file ("model_file"), so mlx-lm builds the model with the classes imported below:

    python -m mlx_lm generate --model DIR --trust-remote-code --prompt "..."

It only imports them from the titans-mlx package, which must be installed where mlx-lm runs (`pip install -e .`
in the titans-mlx repository). titans_mlx.load never runs this file; it builds the model from model_type.
"""

from {module} import Model, ModelArgs  # noqa: F401
'''


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_weights(path: Path) -> Dict[str, mx.array]:
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise ValueError(f"{path}: shard {absent[0]} listed in {INDEX_FILE} is missing")
    else:
        files = sorted(p.name for p in path.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no model*.safetensors weights")
    weights = {}
    for name in files:
        try:
            weights.update(mx.load(str(path / name)))
        except Exception as e:
            raise ValueError(f"{path / name}: unreadable safetensors ({' '.join(str(e).split())})") from None
    return weights


def load_config(path) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path}: not a model directory (no {CONFIG_FILE})")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return config


def _quantize(model: nn.Module, quantization: dict, weights: Dict[str, mx.array], source: str) -> None:
    """Swap in quantized layers where the weights are packed, as mlx-lm's load_model does: the per-layer settings
    `quantize_model` recorded in config["quantization"], else those inferred from a layer's packed weights."""
    from mlx_lm.utils import infer_quant_config

    if not isinstance(quantization, dict) or not {"group_size", "bits"} <= set(quantization):
        raise ValueError(f"{source}: config.json's quantization must give group_size and bits, got {quantization!r}")

    def predicate(path, module):
        if isinstance(quantization.get(path), dict):
            return dict(quantization[path])  # a copy: nn.quantize may edit it
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights or f"{path}.weight" not in weights:
            return False  # not packed (check_weights names any stray scales)
        return infer_quant_config(path, module, weights)

    nn.quantize(model, quantization["group_size"], quantization["bits"], mode=quantization.get("mode", "affine"),
                class_predicate=predicate)


def load(path, lazy: bool = False) -> Tuple[nn.Module, Optional[object]]:
    """Load a model directory written by `python -m convert` or `save_model`.

    Args:
        path: the model directory.
        lazy: leave the weights unevaluated (loaded on first use). Default: ``False``.

    Returns:
        (model, tokenizer): the model in eval mode with its weights, and its tokenizer (None when the
        directory has none, as for a bare NeuralMemory).

    Raises:
        ValueError: not a model directory, unknown model_type, or weights that do not match the
            config exactly (a missing, unexpected or wrongly shaped weight).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a model directory")
    config = load_config(path)
    kind = model_type_of(config)
    model = kind.build(config)
    weights = _read_weights(path)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if config.get("quantization") is not None:
        _quantize(model, config["quantization"], weights, str(path))
    check_weights(model, weights, source=str(path))
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    tokenizer = None
    if (path / SPM_FILE).exists() or (path / TOKENIZER_JSON).exists():
        tokenizer = load_tokenizer(path)
    return model, tokenizer
