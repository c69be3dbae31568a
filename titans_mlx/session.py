"""Sessions: a text read so far, saved to one file and continued later exactly where it stopped.

A session file is an mlx-lm prompt-cache file (written by ``mlx_lm.models.cache.save_prompt_cache``), so mlx-lm reads
it as it is (``mlx_lm.generate --prompt-cache-file``, ``load_prompt_cache``). Its metadata adds what titans_mlx needs
to continue and to refuse what does not fit:

- ``titans_format``/``titans_version``; ``titans_model_id``: sha256 of the model's config and weights;
  ``titans_tokenizer``: the tokenizer's identity;
- ``titans_tokens``: tokens read so far; ``titans_history``: the most recent token ids (what logits processors see);
  ``titans_logits``: the next token's logits (float32, base64), so a session continues with an empty prompt;
- ``titans_checksum``: sha256 of every array of the cache, the logits and the metadata above: a damaged file is
  refused instead of running on with a damaged memory;
- mlx-lm's own ``model`` and ``tokenizer_config`` keys, which ``mlx_lm.generate --prompt-cache-file`` reads.

A plain mlx-lm prompt cache of a Titans model (``mlx_lm.cache_prompt``) loads too, checked against the model's cache
layout; it has no logits, so it continues with a prompt.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

FORMAT = "titans-mlx-session"
VERSION = "2"
HISTORY = 1024  # recent tokens kept in a session, for logits processors (repetition penalty etc.)
_OLD_FORMAT = "titans-mlx-state"  # version 1: our own layout, before the cache was made of mlx-lm's classes


class GenerationError(ValueError):
    """A user error: the CLI prints its message as one line and exits non-zero."""


@dataclasses.dataclass
class GenerationState:
    """Everything needed to continue a text: the model cache, the next token's logits and the position.

    Attributes:
        cache: the model's cache (``model.make_cache()``), updated in place by generation.
        tokens: number of tokens processed so far.
        logits: raw logits (1, vocab) for the token after the last processed one; None before any token.
        history: the last ``HISTORY`` processed tokens (what logits processors look at).
    """

    cache: list
    tokens: int = 0
    logits: Optional[mx.array] = None
    history: List[int] = dataclasses.field(default_factory=list)

    @classmethod
    def new(cls, model: nn.Module) -> "GenerationState":
        return cls(cache=make_cache(model))


def make_cache(model: nn.Module) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def _array_bytes(a: mx.array) -> bytes:
    # through uint8, so that dtypes numpy lacks (bfloat16) hash too
    return np.array(mx.contiguous(a.reshape(-1)).view(mx.uint8)).tobytes()


def model_identity(model: nn.Module) -> str:
    """sha256 of the model's config and weights (names, dtypes, shapes, bytes): what a session file belongs to."""
    h = hashlib.sha256()
    args = getattr(model, "args", None)
    if dataclasses.is_dataclass(args):
        h.update(json.dumps(dataclasses.asdict(args), sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(_array_bytes(value))
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # an mlx-lm TokenizerWrapper
    return f"{type(inner).__name__}(vocab={len(inner)}, eos={getattr(inner, 'eos_token_id', None)})"


def _checksum(cache: list, logits: Optional[mx.array], meta: dict) -> str:
    h = hashlib.sha256()
    for key, value in tree_flatten([c.state for c in cache]):
        if isinstance(value, mx.array):
            h.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
            h.update(_array_bytes(value))
        else:  # the ints, strings and Nones of a cache's state, as save_prompt_cache stores them
            h.update(f"{key}|{type(value).__name__}|{value!r}|".encode())
    if logits is not None:
        h.update(b"logits|" + _array_bytes(logits.astype(mx.float32)))
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def save_state(path, state: GenerationState, model: nn.Module, tokenizer=None, model_path=None) -> None:
    """Write a session to one mlx-lm prompt-cache file (see the module docstring).

    model_path: what mlx-lm's ``--model`` should say for this file (``mlx_lm.generate --prompt-cache-file`` loads
    that model when no --model is given, and refuses a different string).
    """
    from mlx_lm.models.cache import save_prompt_cache

    path = str(path)
    if not path.endswith(".safetensors"):
        raise GenerationError(f"--save-state {path}: the file name must end in .safetensors")
    ours = {
        "titans_format": FORMAT,
        "titans_version": VERSION,
        "titans_model_id": model_identity(model),
        "titans_model_type": str(getattr(model, "model_type", type(model).__name__)),
        "titans_tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else "",
        "titans_tokens": str(state.tokens),
        "titans_history": ",".join(str(t) for t in state.history[-HISTORY:]),
        "titans_logits": "",
    }
    logits = None
    if state.logits is not None:
        logits = state.logits.astype(mx.float32)
        mx.eval(logits)
        ours["titans_logits"] = base64.b64encode(_array_bytes(logits)).decode()
    mx.eval([c.state for c in state.cache])
    metadata = dict(ours, titans_checksum=_checksum(state.cache, logits, ours),
                    model=str(model_path) if model_path is not None else "",
                    tokenizer_config=json.dumps({}))
    save_prompt_cache(path, state.cache, metadata)


def load_state(path, model: nn.Module, tokenizer=None) -> GenerationState:
    """Read a session written by ``save_state`` (or a plain mlx-lm prompt cache of this model).

    Raises:
        GenerationError: a missing, damaged or foreign file, one from another model or tokenizer, or one in the
            first (pre-mlx-lm) session format.
    """
    from mlx_lm.models.cache import load_prompt_cache

    from .cache import check_cache

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"state file {path} does not exist")
    try:
        _, raw = mx.load(str(path), return_metadata=True)
    except Exception:
        raise GenerationError(f"{path} is not a safetensors state file") from None
    if raw.get("format") == _OLD_FORMAT:
        raise GenerationError(
            f"{path} is a session file of titans-mlx's first format, which this version no longer reads; recreate "
            "it by reading the text again: python -m titans_mlx.generate --model DIR --prompt-file TEXT "
            f"--max-tokens 0 --save-state {path.name}")
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception:
        raise GenerationError(f"{path} is not a titans-mlx state file (nor an mlx-lm prompt cache)") from None
    if not isinstance(metadata, dict):
        raise GenerationError(f"{path}: damaged state file (metadata)")
    try:
        check_cache(model, cache)
    except ValueError as e:
        raise GenerationError(f"{path} does not fit this model: {e}") from None

    if metadata.get("titans_format") != FORMAT:  # a plain mlx-lm prompt cache: no logits, position from the cache
        return GenerationState(cache=cache, tokens=model._tokens_before(cache[0].offset))
    if metadata.get("titans_version") != VERSION:
        raise GenerationError(f"{path}: session format version {metadata.get('titans_version')!r} is not supported")
    ours = {k: v for k, v in metadata.items() if k.startswith("titans_") and k != "titans_checksum"}
    try:
        logits = None
        if ours.get("titans_logits"):
            logits = mx.array(np.frombuffer(base64.b64decode(ours["titans_logits"], validate=True),
                                            dtype=np.float32))[None]
        history = [int(t) for t in ours["titans_history"].split(",")] if ours.get("titans_history") else []
        tokens = int(ours["titans_tokens"])
    except (KeyError, ValueError, TypeError):
        raise GenerationError(f"{path}: damaged state file (metadata)") from None
    if metadata.get("titans_checksum") != _checksum(cache, logits, ours):
        raise GenerationError(f"{path}: damaged state file (its checksum does not match its contents)")
    mine = model_identity(model)
    if ours.get("titans_model_id") != mine:
        raise GenerationError(
            f"{path} was saved from another model (model id {ours.get('titans_model_id', '?')[:12]}, "
            f"this model {mine[:12]}); load it with the model that wrote it")
    if tokenizer is not None and ours.get("titans_tokenizer") and ours["titans_tokenizer"] != tokenizer_identity(
            tokenizer):
        raise GenerationError(
            f"{path} was saved with another tokenizer ({ours['titans_tokenizer']}, this one "
            f"{tokenizer_identity(tokenizer)})")
    return GenerationState(cache=cache, tokens=tokens, logits=logits, history=history)
