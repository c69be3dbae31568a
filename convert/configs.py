"""Check a user's titans-pytorch constructor kwargs against a checkpoint, and fill in what the weights fix.

A config is the JSON form of the kwargs given to `MemoryAsContextTransformer` (kind "mac") or
`NeuralMemory` (kind "neural-memory"); a custom memory network is {"class": "MemoryMLP", ...kwargs}.
"""

import re
from typing import Dict, List, Optional, Tuple

# keyword arguments of titans-pytorch 0.5.5's constructors
MAC_KWARGS = {
    "num_tokens", "dim", "depth", "segment_len", "neural_memory_segment_len", "neural_mem_gate_attn_output",
    "neural_memory_add_value_residual", "num_longterm_mem_tokens", "num_persist_mem_tokens",
    "neural_memory_batch_size", "neural_memory_qkv_receives_diff_views", "dim_head", "heads", "ff_mult",
    "num_residual_streams", "neural_memory_model", "neural_memory_kwargs", "neural_memory_layers",
    "use_flex_attn", "sliding_window_attn", "neural_mem_weight_residual", "token_emb",
}
MAC_REQUIRED = ("num_tokens", "dim", "depth", "segment_len")
MEMORY_KWARGS = {
    "dim", "chunk_size", "batch_size", "dim_head", "heads", "model", "store_memory_loss_fn",
    "adaptive_step_transform", "default_step_transform_max_lr", "per_parameter_lr_modulation",
    "max_mem_layer_modulation", "per_head_learned_parameters", "attn_pool_chunks", "momentum", "momentum_order",
    "learned_momentum_combine", "learned_combine_include_zeroth", "num_kv_per_token", "qkv_receives_diff_views",
    "pre_rmsnorm", "post_rmsnorm", "qk_rmsnorm", "max_grad_norm", "use_accelerated_scan", "activation",
    "init_adaptive_step_bias", "init_momentum_bias", "init_decay_bias", "accept_weight_residual",
    "spectral_norm_surprises", "gated_transition", "mem_model_norm_add_residual", "store_with_lookahead_value",
    "default_model_kwargs",
}
MEMORY_REQUIRED = ("dim",)
# the MAC sets these on each NeuralMemory itself
MAC_OWNED_MEMORY_KWARGS = {"dim", "chunk_size", "batch_size", "model", "qkv_receives_diff_views", "accept_weight_residual"}
# kwargs whose torch values are Python callables or modules: nothing JSON can carry
UNSUPPORTED = {"token_emb", "store_memory_loss_fn", "adaptive_step_transform"}


def _mlx_extra(kind: str) -> set:
    """Keys our own configs add (a converted config.json can be fed back in)."""
    import inspect

    if kind == "mac":
        try:
            from titans_mlx.io import MLX_LM_CONFIG_KEYS
            from titans_mlx.mac import ModelArgs
        except ImportError:
            return {"model_type"}
        return set(inspect.signature(ModelArgs).parameters) | set(MLX_LM_CONFIG_KEYS)
    return {"model_type"}


KINDS = {
    "mac": ("titans_mac", "MemoryAsContextTransformer"),
    "neural-memory": ("titans_neural_memory", "NeuralMemory"),
}


class ConfigError(ValueError):
    """A config that does not describe the checkpoint; the message is one line for the user."""


def _shape(sd, key) -> Optional[Tuple[int, ...]]:
    return tuple(sd[key].shape) if key in sd else None


def _fact(facts, key, value, evidence):
    facts[key] = (value, evidence)


def infer_mac(sd: Dict) -> Dict[str, Tuple[object, str]]:
    """Config values a MAC state dict (titans-pytorch names) determines: key -> (value, evidence)."""
    facts = {}
    s = _shape(sd, "token_emb.weight")
    if s and len(s) == 2:
        _fact(facts, "num_tokens", s[0], f"token_emb.weight has shape {s}")
        _fact(facts, "dim", s[1], f"token_emb.weight has shape {s}")
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    if layers:
        _fact(facts, "depth", layers[-1] + 1, f"the checkpoint has layers 0..{layers[-1]}")
    s = _shape(sd, "longterm_mems")
    if s and len(s) == 2:
        _fact(facts, "num_longterm_mem_tokens", s[0], f"longterm_mems has shape {s}")
    s = _shape(sd, "layers.0.5.persistent_memory")
    if s and len(s) == 4:
        ev = f"layers.0.5.persistent_memory has shape {s} (2, heads, tokens, dim_head)"
        _fact(facts, "heads", s[1], ev)
        _fact(facts, "num_persist_mem_tokens", s[2], ev)
        _fact(facts, "dim_head", s[3], ev)
    s = _shape(sd, "expand_streams.stream_embed")
    if s:
        _fact(facts, "num_residual_streams", s[0], f"expand_streams.stream_embed has shape {s}")
    elif layers and not any(k.startswith("layers.0.1.") for k in sd):
        _fact(facts, "num_residual_streams", 1, "the checkpoint has no residual-stream weights")
    hc_keys = [k for k in sd if re.match(r"layers\.\d+\.[012]\.", k)]
    if hc_keys:
        from titans_mlx.hyper_connections import HyperConnection

        legacy = HyperConnection.is_legacy_state_dict(hc_keys)
        _fact(facts, "legacy_hyper_connections", legacy,
              "the residual-stream weights are " + ("legacy hyper-connections (titans-pytorch <= 0.4)" if legacy
                                                   else "mHC (titans-pytorch >= 0.5)"))
    if layers:
        mem = [i + 1 for i in layers if any(k.startswith(f"layers.{i}.4.") for k in sd)]
        _fact(facts, "neural_memory_layers", mem, f"NeuralMemory weights are in layers {mem} (1-based)")
        later = mem[1:]
        if later:
            has = [i for i in later if any(k.startswith(f"layers.{i - 1}.3.") for k in sd)]
            if len(has) in (0, len(later)):
                _fact(facts, "neural_memory_qkv_receives_diff_views", bool(has),
                      "memory layers after the first " + ("have" if has else "lack") + " a qkv layer selector")
            has = [i for i in later
                   if any(k.startswith(f"layers.{i - 1}.4.to_learned_weight_residual_mix.") for k in sd)]
            if len(has) in (0, len(later)):
                _fact(facts, "neural_mem_weight_residual", bool(has),
                      "memory layers after the first " + ("have" if has else "lack") + " weight-residual mixes")
    return facts


def infer_memory(sd: Dict) -> Dict[str, Tuple[object, str]]:
    """Config values a NeuralMemory state dict determines."""
    facts = {}
    s = _shape(sd, "to_queries.weight")
    if s and len(s) == 2:
        _fact(facts, "dim", s[1], f"to_queries.weight has shape {s}")
        gate = next((k for k in ("retrieve_gate.0.weight", "retrieve_gate.weight") if k in sd), None)
        g = _shape(sd, gate) if gate else None
        heads = g[0] if g else 1
        ev = f"{gate} has shape {g}" if g else "there is no retrieve_gate (one head)"
        _fact(facts, "heads", heads, ev)
        if s[0] % heads == 0:
            _fact(facts, "dim_head", s[0] // heads, f"to_queries.weight has shape {s} = (heads * dim_head, dim)")
    if "to_adaptive_step.0.weight" not in sd:
        return facts  # not titans-pytorch names: the flags below are left to the shape check
    # flags that add weights of their own
    for key, weight in (
        ("pre_rmsnorm", "store_norm.weight"),
        ("qk_rmsnorm", "q_norm.gamma"),
        ("post_rmsnorm", "multihead_rmsnorm.gamma"),
        ("attn_pool_chunks", "reduce_to_chunk_rep.to_attn_logits.weight"),
        ("momentum", "to_momentum.0.weight"),
        ("learned_momentum_combine", "to_learned_momentum_combine.0.weight"),
        ("per_parameter_lr_modulation", "to_layer_modulation.0.weight"),
        ("accept_weight_residual", "to_learned_weight_residual_mix.0.weight"),
        ("gated_transition", "transition_gate"),
    ):
        _fact(facts, key, weight in sd, f"{weight} is " + ("present" if weight in sd else "absent"))
    heads = facts.get("heads", (None,))[0]
    if heads:
        for key, weight in (("num_kv_per_token", "to_adaptive_step.0.weight"), ("momentum_order", "to_momentum.0.weight")):
            s = _shape(sd, weight)
            if s and s[0] % heads == 0:
                _fact(facts, key, s[0] // heads, f"{weight} has shape {s} = (heads * {key}, dim)")
    return facts


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    return a == b


def _merge(config: dict, facts: dict, what: str) -> dict:
    out = dict(config)
    for key, (value, evidence) in facts.items():
        if key in config:
            given = config[key]
            if key == "neural_memory_layers" and given is None:
                given = list(range(1, (out.get("depth") or facts.get("depth", (0,))[0]) + 1))
            if not _same(given, value):
                raise ConfigError(f"{what}{key}={config[key]!r} does not fit the checkpoint: {evidence}")
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _looks_like(sd, kind) -> bool:
    if kind == "mac":
        return "token_emb.weight" in sd or any(k.startswith("layers.") for k in sd)
    return "to_queries.weight" in sd or any(k.startswith("memory_model_parameters.") for k in sd)


def check_config(config: dict, kind: str, sd: Dict) -> dict:
    """Validate a user's config for `kind` against the state dict; return it with inferred values filled in.

    Raises:
        ConfigError: unknown or unsupported keys, a config of the other model, missing required keys, or a
            value that contradicts the weights.
    """
    model_type, torch_name = KINDS[kind]
    other = "neural-memory" if kind == "mac" else "mac"
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a JSON object of {torch_name} arguments")
    given_type = config.get("model_type")
    if given_type is not None and given_type != model_type:
        hint = f"; use --kind {other}" if given_type == KINDS[other][0] else ""
        raise ConfigError(f"the config is for model_type {given_type!r}, not {model_type!r} (--kind {kind}){hint}")
    if not _looks_like(sd, kind):
        hint = f" (it looks like a {KINDS[other][1]} checkpoint: use --kind {other})" if _looks_like(sd, other) else ""
        raise ConfigError(f"the checkpoint is not a titans-pytorch {torch_name} state dict{hint}")
    allowed = (MAC_KWARGS if kind == "mac" else MEMORY_KWARGS) | _mlx_extra(kind)
    other_allowed = MEMORY_KWARGS if kind == "mac" else MAC_KWARGS
    for key in config:
        if key not in allowed:
            hint = f" (a {KINDS[other][1]} argument: use --kind {other}?)" if key in other_allowed else ""
            raise ConfigError(f"config key {key!r} is not a {torch_name} argument{hint}")
        if key in UNSUPPORTED and config[key] is not None:
            raise ConfigError(f"config key {key!r} takes a Python object in titans-pytorch; it cannot be converted")
    if kind == "mac":
        nm_kwargs = config.get("neural_memory_kwargs") or {}
        if not isinstance(nm_kwargs, dict):
            raise ConfigError("config key 'neural_memory_kwargs' must be a JSON object")
        for key in nm_kwargs:
            if key not in MEMORY_KWARGS:
                raise ConfigError(f"neural_memory_kwargs key {key!r} is not a NeuralMemory argument")
            if key in MAC_OWNED_MEMORY_KWARGS:
                raise ConfigError(f"neural_memory_kwargs key {key!r} is set by MemoryAsContextTransformer itself")
            if key in UNSUPPORTED and nm_kwargs[key] is not None:
                raise ConfigError(f"neural_memory_kwargs key {key!r} takes a Python object; it cannot be converted")
    for key in ("neural_memory_model", "model"):
        spec = config.get(key)
        if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("class"), str)):
            raise ConfigError(f"config key {key!r} must be null or {{\"class\": \"MemoryMLP\", ...kwargs}}")

    facts = infer_mac(sd) if kind == "mac" else infer_memory(sd)
    out = _merge(config, facts, "config ")
    if kind == "mac" and out.get("neural_memory_layers"):
        # the memories' own kwargs (heads, dim_head, norms) from the first memory layer's weights
        prefix = f"layers.{out['neural_memory_layers'][0] - 1}.4."
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        mem_facts = {k: v for k, v in infer_memory(sub).items() if k not in MAC_OWNED_MEMORY_KWARGS}
        mem_facts = {k: (v, f"{prefix}{e}") for k, (v, e) in mem_facts.items()}
        out["neural_memory_kwargs"] = _merge(out.get("neural_memory_kwargs") or {}, mem_facts, "neural_memory_kwargs ")
    required = MAC_REQUIRED if kind == "mac" else MEMORY_REQUIRED
    missing = [k for k in required if out.get(k) is None]
    if missing:
        raise ConfigError(f"the config lacks required key {missing[0]!r} ({torch_name} argument the weights do not determine)")
    out["model_type"] = model_type
    return out


def first_shape_mismatch(expected: Dict, got: Dict) -> Optional[str]:
    for key in sorted(set(expected) & set(got)):
        if tuple(expected[key].shape) != tuple(got[key].shape):
            return key
    return None


def describe_keys(keys: List[str], limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
