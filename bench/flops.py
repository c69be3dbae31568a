"""Analytic FLOP count of one NeuralMemory forward (store + retrieve), default memory model.

Counted: every matrix product (2·m·k·n FLOPs) and the two per-chunk scans over the memory weights.
Not counted: norms, GELU, sigmoids, means and other elementwise work (O(n·d) or O(n·h) each), and any
padding an implementation adds (titans-pytorch retrieves on n+1 tokens padded to a multiple of C);
the count is the work the algorithm needs, the same figure for both implementations.

Symbols: b batch, n tokens, d model dim, H heads, d_h head dim, h = e·d_h memory-MLP hidden width
(default MemoryMLP(d_h, depth=2, expansion_factor=4): weights W1 (d_h, h), W2 (h, d_h), plus the
ResidualNorm gamma (d_h)), C store chunk, N = floor(n / C) stored chunks, n_s = N·C stored tokens,
P = 2·d_h·h + d_h memory parameters per head.

  store    (per stored token)  keys + values        2 · 2·d·H·d_h
                               adaptive lr          2·d·H
                               memory fwd           H · (2·d_h·h + 2·h·d_h)          K W1, A W2
                               memory bwd           H · (2·h·d_h + 2·d_h·h + 2·d_h·h)  A^T dZ2, dZ2 W2^T, K^T dZ1
           (per chunk)         momentum, decay lr   2 · 2·d·H
                               two scans            2 · 2·H·P                        h_t = a_t·h_{t-1} + x_t
  retrieve (per token)         queries              2·d·H·d_h
                               memory fwd           H · 4·d_h·h
                               if H > 1             gate 2·d·H + combine 2·H·d_h·d

  total = b · [ n_s·(4·d·H·d_h + 2·d·H + 10·H·d_h·h) + N·(4·d·H + 4·H·P)
                + n·(2·d·H·d_h + 4·H·d_h·h + [H>1]·(2·d·H + 2·H·d_h·d)) ]

For d = d_h = 384, h = 1536, H = 1, C = 64 this is about 62·n·d² (= 37.5 GFLOP at n = 4096).
"""

from __future__ import annotations


def neural_memory_flops(n: int, dim: int, chunk: int, batch: int = 1, heads: int = 1,
                        dim_head: int | None = None, expansion: float = 4.0) -> int:
    d, H = dim, heads
    dh = dim_head or dim
    h = int(dh * expansion)
    N = n // chunk
    ns = N * chunk
    P = 2 * dh * h + dh
    store_tok = 4 * d * H * dh + 2 * d * H + 10 * H * dh * h
    store_chunk = 4 * d * H + 4 * H * P
    retr_tok = 2 * d * H * dh + 4 * H * dh * h + ((2 * d * H + 2 * H * dh * d) if H > 1 else 0)
    return batch * (ns * store_tok + N * store_chunk + n * retr_tok)


def matmul_flops(size: int) -> int:
    """(size x size) @ (size x size)."""
    return 2 * size ** 3


# ---------------------------------------------------------------------------------------------- training

TRAIN_FLOPS_DOC = """`python -m bench train` times a lone NeuralMemory's forward + backward with the MAC config's
memory settings.
Forward, counted as above but for any MemoryMLP and the options the train configs use:
  memory MLP of widths w_0..w_D (default (d_h, 4·d_h, d_h)), ΣW = Σ w_l·w_{l+1} parameters in matrices;
  memory fwd per stored token 2·ΣW, per-token gradients 2·(2·ΣW − w_0·w_1) (no input gradient at the first layer),
  retrieve 2·ΣW per token (all per head);
  attn_pool_chunks: the pooling logits Linear(d, d) on every stored token, 2·d² per token;
  per-parameter lr modulation: 2·d·H·(matrices + vectors) per chunk;
  spectral_norm_surprises: Newton–Schulz (5 steps, titans-pytorch's newtonschulz5) on every chunk's update of every
  weight matrix (m × k, m ≤ k): per step X Xᵀ 2·m²·k, A·A 2·m³, B·X 2·m²·k — 5·(4·m²·k + 2·m³) per matrix, per
  chunk and head; with chunk 4 and 64-wide heads this is ~80 % of the store's FLOPs.
Backward ≈ 2 × forward: every forward product C = A·B costs two products of its size in the backward, dA = dC·Bᵀ
and dB = Aᵀ·dC (this holds for the per-token gradient products and Newton–Schulz too, which the backward
differentiates through); elementwise work is not counted on either side. Forward + backward = 3 × forward.
"""


def memory_mlp_dims(dim_head: int, depth: int = 2, expansion: float = 4.0) -> list[int]:
    """Layer widths of MemoryMLP(dim_head, depth, expansion_factor) (titans-pytorch's dims)."""
    hidden = int(dim_head * expansion)
    return [dim_head, *([hidden] * (depth - 1)), dim_head]


def newton_schulz_flops(m: int, k: int, steps: int = 5) -> int:
    m, k = min(m, k), max(m, k)
    return steps * (4 * m * m * k + 2 * m ** 3)


def memory_forward_flops(n: int, dim: int, chunk: int, batch: int = 1, heads: int = 1, dim_head: int | None = None,
                         mlp_dims: list[int] | None = None, spectral_norm: bool = False, attn_pool: bool = False,
                         layer_lr: bool = False, momentum_order: int = 1) -> int:
    """NeuralMemory forward (store + retrieve) FLOPs, n tokens of width dim; the default arguments give
    neural_memory_flops (the residual-norm gamma counts as one vector parameter per head)."""
    d, H = dim, heads
    dh = dim_head or dim
    dims = mlp_dims or memory_mlp_dims(dh)
    mats = list(zip(dims[:-1], dims[1:]))
    sum_w = sum(a * b for a, b in mats)
    P = sum_w + dims[-1]  # + ResidualNorm gamma
    N = n // chunk
    ns = N * chunk
    store_tok = 4 * d * H * dh + 2 * d * H + H * (2 * sum_w + 2 * (2 * sum_w - mats[0][0] * mats[0][1]))
    if attn_pool:
        store_tok += 2 * d * d
    store_chunk = 2 * d * H * momentum_order + 2 * d * H + 2 * H * P * (momentum_order + 1)
    if layer_lr:
        store_chunk += 2 * d * H * (len(mats) + 1)
    if spectral_norm:
        store_chunk += H * sum(newton_schulz_flops(a, b) for a, b in mats)
    retr_tok = 2 * d * H * dh + H * 2 * sum_w + ((2 * d * H + 2 * H * dh * d) if H > 1 else 0)
    return batch * (ns * store_tok + N * store_chunk + n * retr_tok)


def memory_train_flops(*args, **kwargs) -> int:
    """Forward + backward (3 × forward, see above)."""
    return 3 * memory_forward_flops(*args, **kwargs)
