"""Overlap of task unit sets against random sets with the same per-layer counts.

With few units per layer (9 heads in SmolLM2) the overlap two random sets reach by chance is large
and depends on the per-layer counts, so each task pair's Jaccard is compared with the Jaccard of
random sets drawn with exactly the two sets' per-layer counts (``random_like``), over many draws.
Works for any :class:`~tl_taskmap.neurons.units.UnitSet` (neurons or heads).

Example:
    >>> from tl_taskmap.neurons.sets import HeadSet
    >>> sets = {"a": HeadSet(2, 4, {0: [0], 1: [1]}), "b": HeadSet(2, 4, {0: [0], 1: [2]})}
    >>> row = overlap_vs_random(sets, n_draws=200).iloc[0]
    >>> round(float(row.jaccard), 3), bool(0.1 < row.random_mean < 0.3)
    (0.333, True)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from tl_taskmap.neurons.units import UnitSet

COLUMNS = ["task_a", "task_b", "jaccard", "random_mean", "random_low", "random_high", "n_draws"]


def overlap_vs_random(sets: Mapping[str, UnitSet], *, n_draws: int = 200, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Per unordered task pair: the sets' Jaccard and that of ``n_draws`` matched random pairs.

    Draw ``d`` of a pair uses ``a.random_like(seed + 2d)`` and ``b.random_like(seed + 2d + 1)``, so
    results are reproducible and independent of the global RNG. ``random_low``/``random_high`` are the
    ``alpha/2`` and ``1 − alpha/2`` quantiles of the random Jaccards.

    Example:
        >>> overlap_vs_random(head_sets).round(3)   # doctest: +SKIP
    """
    names = list(sets)
    if len(names) < 2:
        raise ValueError(f"overlap_vs_random needs at least two sets, got {names}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be ≥ 1, got {n_draws}")
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            draws = np.array([sets[a].random_like(seed + 2 * d).jaccard(sets[b].random_like(seed + 2 * d + 1)) for d in range(n_draws)])
            rows.append({"task_a": a, "task_b": b, "jaccard": sets[a].jaccard(sets[b]), "random_mean": float(draws.mean()),
                         "random_low": float(np.quantile(draws, alpha / 2)), "random_high": float(np.quantile(draws, 1 - alpha / 2)),
                         "n_draws": n_draws})
    return pd.DataFrame(rows, columns=COLUMNS)
