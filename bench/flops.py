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
