"""The report's "heads" stage: head relevance, head sets, their overlap and the head ablation matrix.

:func:`heads_stage` is called by :func:`tl_taskmap.report.map_model` (stage ``heads``, skipped with
``MapConfig(heads=False)`` / ``--no-heads``) and writes under ``<out>/heads/``:

* ``relevance/<task>.safetensors`` (:class:`~tl_taskmap.neurons.head_attribution.HeadRelevanceScores`),
  ``relevance_by_layer.csv`` (``task, cluster, layer, relevance_share``) and ``relevance_by_head.csv``
  (``task, layer, head, share``: each head's share of the task's total);
* ``sets/<task>.json`` (top-``k`` :class:`~tl_taskmap.neurons.sets.HeadSet`, per layer as configured),
  ``jaccard.csv`` and ``overlap_vs_random.csv``;
* ``ablation/matrix.json``, ``cells.csv``, ``delta_table.csv``, ``specificity.csv`` — the ablation
  matrix of the head sets with matched random head sets, in the configured ablation mode.

A model without ``attn.hook_z`` in every block is recorded as skipped (with the reason), not an error.
Selection and measurement use the same halves as the neuron stages.

Example:
    >>> files, record = heads_stage(run)   # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["heads_stage"]


def heads_stage(run: Any) -> tuple[list[str], dict[str, Any]]:
    """Compute and write the heads stage for a report run; returns ``(files relative to out, record extras)``.

    ``run`` is the report's run object (``model``, ``selection``, ``evaluation``, ``config``, ``layout``, ``path``,
    ``rel``, ``bar``, ``progress``, ``baseline_scores()``); files go where ``run.layout.heads`` says.
    """
    import pandas as pd

    from tl_taskmap.models import UnsupportedModelError
    from tl_taskmap.neurons.ablation_effects import ablation_matrix
    from tl_taskmap.neurons.head_ablation import head_mean_activations
    from tl_taskmap.neurons.head_attribution import head_relevance
    from tl_taskmap.neurons.heads import head_layout
    from tl_taskmap.neurons.overlap import jaccard_matrix
    from tl_taskmap.neurons.random_overlap import overlap_vs_random
    from tl_taskmap.report.stages import write_ablation

    cfg = run.config
    try:
        layout = head_layout(run.model)
    except UnsupportedModelError as err:
        return [], {"skipped": str(err)}
    heads = run.layout.heads
    files: list[str] = []
    layer_rows, head_rows, sets = [], [], {}
    for task in run.bar(list(run.selection), "head relevance"):
        rel = head_relevance(run.model, task, batch_size=cfg.gradient_batch_size)
        path = run.path(heads.relevance(task.name))
        rel.save(path)
        files.append(run.rel(path))
        scores = rel.scores
        total = float(scores.sum()) or 1.0
        for layer, value in enumerate((scores.sum(1) / total).tolist()):
            layer_rows.append({"task": task.name, "cluster": task.cluster, "layer": layer, "relevance_share": value})
        for row in rel.to_dataframe().itertuples():
            head_rows.append({"task": task.name, "layer": row.layer, "head": row.head, "share": row.score / total})
        sets[task.name] = rel.top(cfg.k, per_layer=cfg.per_layer).with_name(task.name)
        path = run.path(heads.head_set(task.name))
        sets[task.name].save(path)
        files.append(run.rel(path))
    tables = {
        "relevance_by_layer.csv": pd.DataFrame(layer_rows),
        "relevance_by_head.csv": pd.DataFrame(head_rows),
        "jaccard.csv": jaccard_matrix(sets),
    }
    if len(sets) >= 2:  # overlap compares tasks: a one-task map has none (the page says why)
        tables["overlap_vs_random.csv"] = overlap_vs_random(sets, seed=cfg.seed)
    for name, table in tables.items():
        path = run.path(heads.table(name))
        table.to_csv(path, index=name == "jaccard.csv")
        files.append(run.rel(path))
    means = head_mean_activations(run.model, run.selection) if cfg.ablation_mode == "mean" else None
    matrix = ablation_matrix(run.model, run.evaluation, sets, seeds=[cfg.seed + i for i in range(cfg.seeds)], mode=cfg.ablation_mode,
                             mean_activations=means, batch_size=cfg.batch_size, progress=run.progress,
                             baselines=run.baseline_scores())
    files += [run.rel(p) for p in write_ablation(matrix, heads.ablation)]
    return files, {"n_heads": {n: len(s) for n, s in sets.items()}, "layout": {"n_heads": layout.n_heads, "d_head": layout.d_head,
                                                                              "n_key_value_heads": layout.n_key_value_heads},
                   "n_evaluations": matrix.meta["n_evaluations"]}
