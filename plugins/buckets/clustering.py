"""Exact, deterministic 1-D helpers for ratio buckets: optimal k-means and ordered matching.

Both are dynamic programs with a single answer for a given input (ties go to the lowest index),
so the same images always give the same buckets, with no random seed involved.
"""
from __future__ import annotations

import math
from typing import List, Sequence

#: Log ratios are rounded to this before clustering: 100,000 images become at most a few
#: thousand distinct values, far finer than the step rounding of bucket sides.
LOG_RATIO_RESOLUTION = 1e-3


def spread(n: int, half_range: float) -> List[float]:
    """``n`` evenly spaced values over [-half_range, half_range] (just 0 for n = 1)."""
    if n == 1:
        return [0.0]
    return [-half_range + 2 * half_range * i / (n - 1) for i in range(n)]


def kmeans_1d(values: Sequence[float], k: int, resolution: float = LOG_RATIO_RESOLUTION) -> List[float]:
    """Centres (ascending) of the k clusters of ``values`` with the least within-cluster squared error.

    Exact over the values rounded to ``resolution``; fewer than k centres when there are fewer
    distinct values.
    """
    import numpy as np

    if len(values) == 0:
        raise ValueError("cannot cluster an empty list")
    keys, counts = np.unique(np.round(np.asarray(values, dtype=np.float64) / resolution).astype(np.int64), return_counts=True)
    x = keys.astype(np.float64) * resolution
    w = counts.astype(np.float64)
    n = len(x)
    k = min(k, n)
    cw = np.concatenate(([0.0], np.cumsum(w)))
    cs = np.concatenate(([0.0], np.cumsum(w * x)))
    cq = np.concatenate(([0.0], np.cumsum(w * x * x)))

    def cost(starts: "np.ndarray", end: int) -> "np.ndarray":
        # Squared error of the points [start, end) around their weighted mean.
        ww = cw[end] - cw[starts]
        ss = cs[end] - cs[starts]
        return (cq[end] - cq[starts]) - ss * ss / ww

    best = np.full((k + 1, n + 1), math.inf)
    start_of_last = np.zeros((k + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for end in range(m, n + 1):
            starts = np.arange(m - 1, end)
            total = best[m - 1, starts] + cost(starts, end)
            i = int(np.argmin(total))
            best[m, end] = total[i]
            start_of_last[m, end] = starts[i]
    centres = []
    end = n
    for m in range(k, 0, -1):
        start = int(start_of_last[m, end])
        centres.append(float((cs[end] - cs[start]) / (cw[end] - cw[start])))
        end = start
    return sorted(centres)


def match_ordered(targets: Sequence[float], candidates: Sequence[float]) -> List[int]:
    """Distinct candidate indices, one per target, keeping order, with the least total |difference|.

    Both sequences must be ascending and ``len(candidates) >= len(targets)``.
    """
    n, m = len(targets), len(candidates)
    if n > m:
        raise ValueError(f"{n} targets but only {m} candidates")
    inf = math.inf
    # cost[i][j]: best total for the first i targets using only the first j candidates.
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    cost[0] = [0.0] * (m + 1)
    for i in range(1, n + 1):
        for j in range(i, m + 1):
            take = cost[i - 1][j - 1] + abs(targets[i - 1] - candidates[j - 1])
            cost[i][j] = min(cost[i][j - 1], take)
    chosen: List[int] = []
    j = m
    for i in range(n, 0, -1):
        while cost[i][j] == cost[i][j - 1] and j - 1 >= i:  # skip candidates the optimum does not use
            j -= 1
        chosen.append(j - 1)
        j -= 1
    return chosen[::-1]
