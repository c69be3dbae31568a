"""python -m convert: a titans-pytorch checkpoint -> an MLX model directory (titans_mlx.load reads it).

    python -m convert --torch-path mac_transformer.pt --config config.json --mlx-path titans-mac
"""

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_KIND = "mac"
DEFAULT_TOKENIZER = "bytes"
DTYPES = ("float32", "bfloat16", "float16")
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
        description="Convert a titans-pytorch checkpoint (torch.save zip or .safetensors) to an MLX model directory.",
    )
    parser.add_argument("--torch-path", required=True, help="checkpoint: a torch.save file (.pt/.pth/.bin) or .safetensors")
    parser.add_argument(
        "--config",
        help="JSON file of the kwargs given to MemoryAsContextTransformer (or NeuralMemory with --kind neural-memory); "
        "optional when the checkpoint stores a config next to its state dict",
    )
    parser.add_argument("--mlx-path", required=True, help="output directory (must not exist, unless --force)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights (default: keep the checkpoint's)")
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="'bytes' (256 byte tokens, as train_mac.py), a sentencepiece .model file, or 'none' (default: bytes)",
    )
    parser.add_argument("--kind", choices=("mac", "neural-memory"), default=DEFAULT_KIND, help="model class (default: mac)")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory at --mlx-path")
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
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from titans_mlx.io import save_model

    from .checkpoint import read_checkpoint
    from .configs import ConfigError, check_config, describe_keys

    out = Path(args.mlx_path)
    if out.exists() or out.is_symlink():
        from titans_mlx.io import is_model_dir

        if not args.force:
            raise UserError(f"--mlx-path {out} already exists (pass --force to replace it)")
        if not is_model_dir(out):
            raise UserError(f"--mlx-path {out} exists and is not a model directory; refusing to replace it")
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

    if args.dtype is not None:
        dtype = getattr(mx, args.dtype)
        print(f"[INFO] Using dtype: {args.dtype}")
        predicate = getattr(model, "cast_predicate", lambda key: True)
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and predicate(k) else v
            for k, v in weights.items()
        }
    else:
        # float64 has no MLX GPU support; everything else is kept as stored
        weights = {k: v.astype(mx.float32) if v.dtype == mx.float64 else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())

    if tokenizer is not None and len(tokenizer) > config["num_tokens"]:
        raise UserError(
            f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens but the model only {config['num_tokens']} "
            "(pass --tokenizer none for a model without one)"
        )
    try:
        save_model(out, model, config, tokenizer, overwrite=args.force)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    n = sum(v.size for v in weights.values())
    print(f"[INFO] Saved {len(weights)} weights ({n:,} parameters) to {out}")
    return out


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
