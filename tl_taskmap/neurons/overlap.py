"""Overlap of task-specific neuron sets across tasks: Jaccard matrices and the top-k% sweep.

The sweep reproduces the analysis of Leng & Xiong (2024), Table 8: how much the top-k% neurons of
two tasks overlap as k grows (at k = 100% every set is the whole model, so the overlap is 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.neurons.sets import NeuronSet


def jaccard_matrix(sets: Mapping[str, NeuronSet], per_layer: bool = False) -> pd.DataFrame:
    """Pairwise Jaccard overlap of named neuron sets.

    ``per_layer=False`` gives a task x task DataFrame (symmetric, ones on the diagonal).
    ``per_layer=True`` gives a long DataFrame with columns ``task_a, task_b, layer, jaccard`` over
    all ordered pairs, so ``df.pivot_table(...)`` recovers one matrix per layer. Layers (or
    whole sets) where both are empty count as overlap 1.0.

    Example:
        >>> sets = {"sst2": NeuronSet(1, 4, {0: [0, 1]}), "qqp": NeuronSet(1, 4, {0: [1, 2]})}
        >>> jaccard_matrix(sets).round(3).values.tolist()
        [[1.0, 0.333], [0.333, 1.0]]
    """
    names = list(sets)
    if not names:
        raise ValueError("jaccard_matrix needs at least one neuron set")
    if not per_layer:
        matrix = pd.DataFrame(1.0, index=names, columns=names)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                matrix.loc[a, b] = matrix.loc[b, a] = sets[a].jaccard(sets[b])
        return matrix
    rows = []
    for a in names:
        for b in names:
            for layer, value in enumerate(sets[a].jaccard_per_layer(sets[b])):
                rows.append({"task_a": a, "task_b": b, "layer": layer, "jaccard": value})
    return pd.DataFrame(rows, columns=["task_a", "task_b", "layer", "jaccard"])


def overlap_sweep(
    scores_by_task: Mapping[str, Float[Tensor, "n_layers d_mlp"]],
    fractions: Iterable[float] = (0.1, 0.3, 0.5, 0.7, 1.0),
    per_layer: bool = True,
) -> pd.DataFrame:
    """Jaccard overlap of every pair of tasks' top-k% neurons, for each fraction k.

    Returns a long DataFrame with columns ``task_a, task_b, fraction, jaccard``, one row per
    unordered task pair (in the mapping's order) and fraction.

    Example:
        >>> import torch
        >>> scores = {"a": torch.tensor([[3.0, 2.0, 1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0, 1.0, 3.0]])}
        >>> overlap_sweep(scores, fractions=(0.25, 0.5, 1.0))["jaccard"].round(3).tolist()
        [0.0, 0.333, 1.0]
    """
    names = list(scores_by_task)
    if len(names) < 2:
        raise ValueError(f"overlap_sweep needs at least two tasks, got {len(names)}: {names}")
    fractions = list(fractions)
    rows = []
    for fraction in fractions:
        sets = {name: NeuronSet.top_k(scores_by_task[name], fraction, per_layer=per_layer) for name in names}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                overlap = sets[a].jaccard(sets[b])
                rows.append({"task_a": a, "task_b": b, "fraction": float(fraction), "jaccard": overlap})
    return pd.DataFrame(rows, columns=["task_a", "task_b", "fraction", "jaccard"])
