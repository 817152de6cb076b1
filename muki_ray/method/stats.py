"""Mergeable pool-wide statistics (pure): what `data.fold` adds up from per-block partials.

Every statistic the combiner needs over the whole pool (a margin mean, per-teacher moments and
quantiles, prototype sums, report counters) is a partial per block, merged on the driver as the
partials stream in, so the driver's memory is one partial's size, whatever the pool's size.

Quantiles come from a KLL sketch (`datasketches`, the sketch behind Ray Data's
ApproximateQuantile): mergeable, exact while it holds every value (fewer than about K values),
and within about 1.3/K^0.9 in rank beyond (K = 4096: 0.07%).
"""

from __future__ import annotations

import numpy as np
from datasketches import kll_doubles_sketch

SKETCH_K = 4096


def add(a, b):
    """Merge by addition: numbers, arrays, and tuples or dicts of them (a key on one side only is kept)."""
    if isinstance(a, tuple):
        return tuple(add(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in a.keys() | b.keys()}
    return a + b


class Sketch:
    """A mergeable quantile sketch of float64 values, picklable (it travels between tasks)."""

    def __init__(self, values=None, k: int = SKETCH_K):
        self.s = kll_doubles_sketch(k)
        if values is not None and len(values):
            self.s.update(np.asarray(values, dtype=np.float64))

    def __getstate__(self):
        return {"b": self.s.serialize()}

    def __setstate__(self, state):
        self.s = kll_doubles_sketch.deserialize(state["b"])

    def merge(self, other: "Sketch") -> "Sketch":
        self.s.merge(other.s)
        return self

    @property
    def n(self) -> int:
        return self.s.n

    def quantiles(self, m: int) -> np.ndarray:
        """(m,) values at the ranks (j + 0.5) / m: the distribution summarized in m points."""
        if self.n == 0:
            return np.zeros(0)
        return np.asarray(self.s.get_quantiles(((np.arange(m) + 0.5) / m).tolist()), dtype=np.float64)

    def mid_rank(self, x: np.ndarray) -> np.ndarray:
        """(B,) -> (B,) mid-rank quantiles (F(x-) + F(x)) / 2: the share of values below x, ties
        counted half (on the pool itself, exactly the mean-rank (rank + 0.5) / n)."""
        x = np.asarray(x, dtype=np.float64)
        if self.n == 0 or len(x) == 0:
            return np.full(len(x), 0.5)
        points, inverse = np.unique(x, return_inverse=True)
        below = np.asarray(self.s.get_cdf(points.tolist(), inclusive=False))[:-1]
        upto = np.asarray(self.s.get_cdf(points.tolist(), inclusive=True))[:-1]
        return ((below + upto) / 2.0)[inverse.reshape(-1)]

    def value_at_top(self, take: int) -> float:
        """The value v such that about `take` of the n values are >= v (ties at v all count)."""
        rank = min(1.0, (self.n - take) / self.n + 0.5 / self.n)
        return float(self.s.get_quantile(rank, inclusive=True))
