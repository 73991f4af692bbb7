"""Exact, deterministic 1-D helpers for ratio buckets: optimal k-means and ordered matching.

Both are dynamic programs with a single answer for a given input (ties go to the lowest index),
so the same images always give the same buckets, with no random seed involved. Both run in numpy
with a bounded number of Python steps, so the largest configs the bucket limits allow
(num_buckets = 256, about 6,000 distinct log ratios, 7,000 candidate sizes) fit in about a second.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence

if TYPE_CHECKING:
    import numpy as np

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
    distinct values. The classic O(k n^2) dynamic program, with each of its k layers solved by
    divide and conquer (the best start of the last cluster never decreases as the end grows), so
    O(k n log n) work in O(k log n) numpy steps.
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

    def cost(starts: "np.ndarray", ends: "np.ndarray") -> "np.ndarray":
        # Squared error of the points [start, end) around their weighted mean.
        ww = cw[ends] - cw[starts]
        ss = cs[ends] - cs[starts]
        return (cq[ends] - cq[starts]) - ss * ss / ww

    best = np.full(n + 1, np.inf)  # best[end]: least error of the first `end` points in m clusters
    best[0] = 0.0
    # start_of_last[m, end]: where the last of m clusters over the first `end` points starts.
    start_of_last = np.zeros((k + 1, n + 1), dtype=np.int32)
    for m in range(1, k + 1):
        best, start_of_last[m] = _layer(best, cost, m, n)
    centres = []
    end = n
    for m in range(k, 0, -1):
        start = int(start_of_last[m, end])
        centres.append(float((cs[end] - cs[start]) / (cw[end] - cw[start])))
        end = start
    return sorted(centres)


def _layer(prev: "np.ndarray", cost, m: int, n: int) -> "tuple[np.ndarray, np.ndarray]":
    """One layer of the k-means program: for every end in [m, n], the start s in [m - 1, end - 1]
    minimising ``prev[s] + cost(s, end)`` (the lowest such s on ties), and that minimum.

    Divide and conquer on the end, one recursion level at a time for all open ranges together:
    the best start for the middle end bounds the starts its left and right halves search.
    """
    import numpy as np

    cur = np.full(n + 1, np.inf)
    arg = np.zeros(n + 1, dtype=np.int32)
    # Open ranges: ends [lo, hi] whose best starts lie in [s_lo, s_hi].
    lo, hi = np.array([m]), np.array([n])
    s_lo, s_hi = np.array([m - 1]), np.array([n - 1])
    while lo.size:
        mid = (lo + hi) // 2
        lengths = np.minimum(s_hi, mid - 1) - s_lo + 1
        offsets = np.cumsum(lengths) - lengths
        # Every (range, start) pair of this level, flat: the starts each range searches.
        flat = np.arange(int(offsets[-1] + lengths[-1]))
        starts = flat + np.repeat(s_lo - offsets, lengths)
        totals = prev[starts] + cost(starts, np.repeat(mid, lengths))
        lowest = np.minimum.reduceat(totals, offsets)
        first = np.minimum.reduceat(np.where(totals == np.repeat(lowest, lengths), flat, flat.size), offsets)
        best_start = starts[first]
        cur[mid], arg[mid] = lowest, best_start
        left, right = lo < mid, mid < hi
        lo, hi, s_lo, s_hi = (
            np.concatenate((lo[left], mid[right] + 1)),
            np.concatenate((mid[left] - 1, hi[right])),
            np.concatenate((s_lo[left], best_start[right])),
            np.concatenate((best_start[left], s_hi[right])),
        )
    return cur, arg


def match_ordered(targets: Sequence[float], candidates: Sequence[float]) -> List[int]:
    """Distinct candidate indices, one per target, keeping order, with the least total |difference|.

    Both sequences must be ascending and ``len(candidates) >= len(targets)``. Row by row in numpy:
    ``cost[i][j]`` (the best total for the first i targets using only the first j candidates) is a
    running minimum over j of taking candidate j for target i.
    """
    import numpy as np

    n, m = len(targets), len(candidates)
    if n > m:
        raise ValueError(f"{n} targets but only {m} candidates")
    cand = np.asarray(candidates, dtype=np.float64)
    columns = np.arange(m + 1)
    cost = np.zeros(m + 1)  # row 0: no targets cost nothing
    # used[i - 1][j]: the candidate column (1-based) target i takes when the first j are available;
    # the lowest column on ties, as the original loop's backtracking chose.
    used = np.zeros((n, m + 1), dtype=np.int32)
    for i in range(1, n + 1):
        take = np.full(m + 1, np.inf)
        take[i:] = cost[i - 1:m] + np.abs(targets[i - 1] - cand[i - 1:])
        running = np.minimum.accumulate(take)
        new_low = np.empty(m + 1, dtype=bool)
        new_low[0] = True
        new_low[1:] = take[1:] < running[:-1]
        used[i - 1] = np.maximum.accumulate(np.where(new_low, columns, 0))
        cost = running
    chosen: List[int] = []
    j = m
    for i in range(n, 0, -1):
        j = int(used[i - 1, j])
        chosen.append(j - 1)
        j -= 1
    return chosen[::-1]
