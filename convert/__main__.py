"""python -m convert: a titans-pytorch checkpoint -> an MLX model directory (titans_mlx.load reads it).

    python -m convert --torch-path mac_transformer.pt --config config.json --mlx-path titans-mac
    python -m convert --model titans-mac --mlx-path titans-mac-q8 -q --q-bits 8     # quantize an MLX model directory

Quantization is mlx-lm's (`quantize_model`, its `quantization` entry in config.json), so mlx-lm loads the result too.
"""

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_KIND = "mac"
DEFAULT_TOKENIZER = "bytes"
DTYPES = ("float32", "bfloat16", "float16")
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
DEFAULT_Q_BITS, DEFAULT_Q_GROUP_SIZE = 4, 64  # as mlx-lm's convert
PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DataParallel wrappers


class UserError(Exception):
    """Bad input: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m convert",
        description="Convert a titans-pytorch checkpoint (torch.save zip or .safetensors) to an MLX model directory, "
        "or cast/quantize an MLX model directory.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch-path", help="checkpoint: a torch.save file (.pt/.pth/.bin) or .safetensors")
    source.add_argument("--model", help="an MLX model directory (from this converter) to cast or quantize instead")
    parser.add_argument(
        "--config",
        help="JSON file of the kwargs given to MemoryAsContextTransformer (or NeuralMemory with --kind neural-memory); "
        "optional when the checkpoint stores a config next to its state dict",
    )
    parser.add_argument("--mlx-path", required=True, help="output directory (must not exist, unless --force)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights (default: keep the checkpoint's)")
    parser.add_argument(
        "--tokenizer",
        default=None,  # None: not given (--model keeps the directory's own)
        help="'bytes' (256 byte tokens, as train_mac.py), a sentencepiece .model file, or 'none' (default: bytes)",
    )
    parser.add_argument("--kind", choices=("mac", "neural-memory"), default=None, help="model class (default: mac)")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory at --mlx-path")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights (mlx-lm's affine "
                        "quantization; the memory's gates and fast weights and the positional MLPs stay full precision)")
    parser.add_argument("--q-bits", type=int, choices=Q_BITS, default=None,
                        help=f"bits per quantized weight (default: {DEFAULT_Q_BITS})")
    parser.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, default=None,
                        help=f"weights sharing one scale and bias (default: {DEFAULT_Q_GROUP_SIZE}); layers whose input "
                        "width it does not divide stay unquantized")
    return parser


def _read_config(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read ({e})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: expected a JSON object of constructor arguments")
    return config


def _strip_prefixes(sd: dict) -> dict:
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def convert(args) -> Path:
    from titans_mlx.io import save_model

    out = Path(args.mlx_path)
    if out.exists() or out.is_symlink():
        from titans_mlx.io import is_model_dir

        if not args.force:
            raise UserError(f"--mlx-path {out} already exists (pass --force to replace it)")
        if not is_model_dir(out):
            raise UserError(f"--mlx-path {out} exists and is not a model directory; refusing to replace it")
    if not args.quantize and (args.q_bits is not None or args.q_group_size is not None):
        raise UserError("--q-bits and --q-group-size apply with -q/--quantize only")
    if args.model is not None:
        model, config, tokenizer, weights = _from_model_dir(args, out)
    else:
        model, config, tokenizer, weights = _from_checkpoint(args)
    if args.quantize:
        from mlx_lm.utils import quantize_model

        bits, group_size = args.q_bits or DEFAULT_Q_BITS, args.q_group_size or DEFAULT_Q_GROUP_SIZE
        print(f"[INFO] Quantizing to {bits} bits in groups of {group_size}")
        # mlx-lm takes model.quant_predicate itself (as its own convert would) and records every layer's settings
        # in config["quantization"], which titans_mlx.load and mlx-lm's loader both read
        model, config = quantize_model(model, config, group_size, bits)
    try:
        save_model(out, model, config, tokenizer, overwrite=args.force)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    n = sum(v.size for v in weights.values())
    print(f"[INFO] Saved {len(weights)} weights ({n:,} parameters) to {out}")
    return out


def _cast(weights: dict, dtype, predicate) -> dict:
    """--dtype: cast the floating weights the model's cast_predicate allows; without it only float64 (no MLX GPU
    support) becomes float32 and everything else is kept as stored."""
    import mlx.core as mx

    if dtype is not None:
        print(f"[INFO] Using dtype: {dtype}")
        dtype = getattr(mx, dtype)
        return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and predicate(k) else v
                for k, v in weights.items()}
    return {k: v.astype(mx.float32) if v.dtype == mx.float64 else v for k, v in weights.items()}


def _from_model_dir(args, out: Path):
    """--model: an MLX model directory, with its own config and tokenizer, to cast and/or quantize."""
    from mlx.utils import tree_flatten

    from titans_mlx.io import load, load_config

    given = [flag for flag, value in (("--config", args.config), ("--tokenizer", args.tokenizer), ("--kind", args.kind))
             if value is not None]
    if given:
        raise UserError(f"{given[0]} applies to --torch-path only (--model keeps the directory's config and tokenizer)")
    src = Path(args.model)
    if not src.is_dir():
        raise UserError(f"--model {src}: no such directory")
    if src.resolve() == out.resolve():
        raise UserError("--mlx-path must differ from --model")
    try:
        config = load_config(src)
    except ValueError as e:
        raise UserError(f"--model {_one_line(e)}") from None
    quantization = config.get("quantization")
    if quantization is not None:
        bits = quantization.get("bits") if isinstance(quantization, dict) else None
        raise UserError(f"--model {src} is already quantized ({bits}-bit); convert its unquantized original instead")
    print(f"[INFO] Loading {src}")
    try:
        model, tokenizer = load(src)
    except ValueError as e:
        raise UserError(f"--model {_one_line(e)}") from None
    weights = _cast(dict(tree_flatten(model.parameters())), args.dtype, getattr(model, "cast_predicate", lambda k: True))
    model.load_weights(list(weights.items()), strict=True)
    return model, config, tokenizer, weights


def _from_checkpoint(args):
    """--torch-path: a titans-pytorch state dict and the config it was built with -> the MLX model, checked."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .checkpoint import read_checkpoint
    from .configs import ConfigError, check_config, describe_keys

    args.kind = args.kind or DEFAULT_KIND
    args.tokenizer = args.tokenizer or DEFAULT_TOKENIZER
    tokenizer = None
    if args.kind == "mac" and args.tokenizer != "none":
        from titans_mlx.tokenizer import make_tokenizer

        tokenizer = make_tokenizer(args.tokenizer)
    elif args.kind != "mac" and args.tokenizer not in (DEFAULT_TOKENIZER, "none"):
        raise UserError("--tokenizer applies to --kind mac only")

    print(f"[INFO] Loading {args.torch_path}")
    sd, stored_config = read_checkpoint(args.torch_path)
    sd = _strip_prefixes(sd)
    if args.config is not None:
        config = _read_config(args.config)
    elif stored_config is not None:
        print("[INFO] Using the config stored in the checkpoint")
        config = stored_config
    else:
        raise UserError("--config is required: the checkpoint stores no config")

    config = check_config(config, args.kind, sd)
    from titans_mlx.io import build_model

    try:
        model = build_model(config)
    except (ValueError, TypeError, NotImplementedError, AssertionError) as e:
        raise UserError(f"invalid config: {_one_line(e)}") from None
    try:
        weights = model.sanitize(dict(sd)) if hasattr(model, "sanitize") else dict(sd)
    except (ValueError, KeyError, IndexError) as e:
        raise UserError(f"the checkpoint does not fit the config: {_one_line(e)}") from None

    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        raise ConfigError(f"the checkpoint lacks weights the config needs: {describe_keys(missing)}")
    if unexpected:
        raise ConfigError(f"the checkpoint has weights the config does not create: {describe_keys(unexpected)}")
    for key in sorted(expected):
        have, want = tuple(weights[key].shape), tuple(expected[key].shape)
        if have != want:
            raise ConfigError(f"weight {key}: the checkpoint has shape {have}, the config gives {want}")

    weights = _cast(weights, args.dtype, getattr(model, "cast_predicate", lambda key: True))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())

    if tokenizer is not None and len(tokenizer) > config["num_tokens"]:
        raise UserError(
            f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens but the model only {config['num_tokens']} "
            "(pass --tokenizer none for a model without one)"
        )
    return model, config, tokenizer, weights


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .configs import ConfigError

    try:
        convert(args)
    except (UserError, CheckpointError, ConfigError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # still one line; TITANS_MLX_DEBUG=1 shows the traceback
        if os.environ.get("TITANS_MLX_DEBUG"):
            raise
        kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
        print(f"error: {kind}{_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
