"""absolute_positions=False: the MAC without its axial positional embedding (titans-mlx only).

The oracle is the model with the embedding whose two MLPs end in zero weights and biases (their output is exactly
zero, so the original code path adds nothing): the same weights otherwise must give the same logits, in one call,
streamed in uneven pieces and token by token through the compiled decode step.
"""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from titans_mlx.mac import Model, ModelArgs

CONFIG = dict(num_tokens=64, dim=32, depth=2, segment_len=8, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
              dim_head=16, heads=2, num_residual_streams=1, sliding_window_attn=True,
              neural_memory_kwargs={"dim_head": 16, "heads": 2})


def _pair():
    mx.random.seed(3)
    without = Model(ModelArgs(**CONFIG, absolute_positions=False))
    mx.random.seed(3)
    with_zero = Model(ModelArgs(**CONFIG))
    for mlp in with_zero.axial_pos_emb.mlps:
        last = mlp.layers[-1]
        last.weight = mx.zeros_like(last.weight)
        last.bias = mx.zeros_like(last.bias)
    shared = {k: v for k, v in tree_flatten(with_zero.parameters()) if not k.startswith("axial_pos_emb.")}
    without.load_weights(list(shared.items()))  # strict: every parameter of `without` is given, none left over
    return without, with_zero


def test_no_axial_parameters_and_equal_to_a_zero_embedding_in_one_call_and_streamed():
    without, with_zero = _pair()
    assert without.axial_pos_emb is None
    assert not [k for k, _ in tree_flatten(without.parameters()) if "axial" in k]
    ids = mx.array(np.random.default_rng(0).integers(0, 64, (2, 45)))
    expected = np.array(with_zero(ids))
    assert np.abs(np.array(without(ids)) - expected).max() <= 1e-5 * np.abs(expected).max()
    cache, parts = without.make_cache(), []
    for a, b in ((0, 5), (5, 21), (21, 30)) + tuple((t, t + 1) for t in range(30, 45)):  # the last 15 decoded
        parts.append(np.array(without(ids[:, a:b], cache=cache)))
    streamed = np.concatenate(parts, axis=1)
    assert np.abs(streamed - expected).max() <= 1e-4 * np.abs(expected).max()
