"""The order in which the backward's dk/dv kernels tile a visible-scope row's keys, shared by the
Triton and CUDA backends (torch ops only).

On the PREFIX path (visible scope, causal, query-broadcast bias) key j is visible to query i iff
``j <= c_i < death_j``; a dk/dv tile of keys visits the query blocks from its earliest key to its
latest death, testing per element where only some of its keys are alive. Which keys share a tile
decides how much of that work is wasted; ``alive_order`` picks tiles whose keys are born and die
close together.
"""

from __future__ import annotations

import math

import torch


def order_chunk(window: int, block_n: int) -> int:
    """Keys per chunk of ``alive_order``: ``round(sqrt(window / block_n))`` tiles of ``block_n``.

    A tile's query blocks run from its earliest key to its latest death; the blocks where only
    some of its keys are alive are tested per element, the others take the FULL path. In death
    order a tile's deaths are close but its births spread over the whole prefix; sorting chunks of
    several tiles by position narrows the births by the number of tiles in the chunk and widens the
    deaths by the same factor. Simulated (T32k-like rows, random bias, both edges in query blocks)
    the best chunk was 2 tiles at w / block_n = 4 and 8, 4 at 16, 6 at 32, 8 at 64: the square root
    (for block_m = 64 and 128 alike)."""
    return max(1, round(math.sqrt(window / block_n))) * block_n


def alive_order(death: torch.Tensor, window: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys ever alive (death_j > j) in the dk/dv kernel's tile order, int32 (rows, K) with
    the dead keys after them, and how many are alive per row, int32 (rows,).

    The order: by death descending (ties by position), then each chunk of ``order_chunk`` keys
    sorted by position. The first chunks hold the keys that never die (death K), in position
    order, whose tiles are FULL from their last key on.

    Simulated on T32k (8 rows of bf16 randn bias, w = 2048, dk/dv blocks 128 x 64; per row:
    query-block x tile steps tested + FULL = visited, useful pairs / visited pairs, and a cost
    counting a tested step as 1.5 FULL ones; the useful pairs alone fill 7936 steps):
      death order, all tested (the kernel before its PREFIX FULL range): 11950 + 0, 0.66, 17925
      death order:                                    7952 + 3998 = 11950, 0.66, 15926
      buckets of 2048 deaths, then position:          4972 + 5615 = 10587, 0.75, 13073
      chunks of 2 / 4 / 6 / 8 tiles (6: this order):  4502 + 5758 = 10261, 0.77, 12512
                                                      3097 + 6454 =  9552, 0.83, 11100
                                                      2975 + 6529 =  9504, 0.84, 10992
                                                      3101 + 6494 =  9594, 0.83, 11145
      k-d splits (median of the wider of birth/death): 3113 + 6432 = 9545, 0.83, 11101
    At 2x per tested step the ranking is the same (chunks of 6: 12479 against 23900 before).
    Both sorts are over K int keys per row."""
    rows, K = death.shape
    dev = death.device
    j = torch.arange(K, device=dev, dtype=torch.int32)
    alive = death > j
    n_alive = alive.sum(-1, dtype=torch.int32)
    by_death = torch.where(alive, death, -1).sort(dim=-1, descending=True, stable=True).indices
    rank = torch.arange(K, device=dev)
    # Dead keys (the tail of by_death) get a chunk of their own, past every alive one.
    chunk = torch.where(rank < n_alive[:, None], rank // order_chunk(window, block_n), K)
    order = (chunk * K + by_death).sort(dim=-1).values % K
    return order.to(torch.int32).contiguous(), n_alive
