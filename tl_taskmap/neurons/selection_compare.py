"""Which selection method finds neurons that are a task's *own*? A side-by-side comparison.

For each method (:mod:`tl_taskmap.neurons.selection`), each task's set is chosen on the selection
split and ablated on the held-out evaluation split, with matched random sets, through the ablation
matrix's public API (:func:`~tl_taskmap.neurons.ablation_effects.ablation_matrix` and
:func:`~tl_taskmap.neurons.ablation_effects.specificity`). Per method × task the table holds:

* ``own_drop``, ``vs_random`` (own drop − random drop) and ``vs_other`` (own drop − mean drop from
  the other tasks' sets) of the task's metric, with the specificity bootstrap intervals (resampling
  examples, and random seeds for the random term);
* ``loss_vs_random`` / ``loss_vs_other``: the same differences of answer-loss increases (nats; point
  estimates);
* ``n_neurons``, ``jaccard_other`` (mean Jaccard overlap with the other tasks' sets of the same
  method) and ``jaccard_random`` (the same for matched random sets: what chance overlap would be).

A task is *above chance* when its baseline beats chance (generation tasks: when it is above 0).
The verdict names the method with the most above-chance tasks whose own > other interval lies above
zero (ties: more own > random, then the larger mean ``loss_vs_other``), and says so plainly when no
method separates any task.

Cost: per method one ablation matrix, ``T + D·T`` task evaluations for ``T`` tasks and ``D ≤ T·(1 +
seeds)`` distinct sets; ``contrastive`` also needs one relevance pass per answer option. A
precomputed matrix (``matrices={"gradxact": m}``) is reused.

Example:
    >>> from tl_taskmap.neurons.selection_compare import compare_selections
    >>> cmp = compare_selections(model, selection, evaluation, ["gradxact", "specific"], seeds=3)   # doctest: +SKIP
    >>> cmp.summary, cmp.verdict                                                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.neurons.ablation_effects import AblationMatrix, ablation_matrix, specificity
from tl_taskmap.neurons.selection import METHODS, ScoreFn, Selection, TasksLike, select_all
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import as_suite
from tl_taskmap.state_io import FORMAT_VERSIONS

FORMAT = "tl_taskmap.SelectionComparison"
FORMAT_VERSION = FORMAT_VERSIONS["selection_comparison"]
TABLE_COLUMNS = ["method", "task", "metric", "baseline", "chance", "above_chance", "n_neurons", "own_drop", "random_drop", "other_drop",
                 "vs_random", "vs_random_low", "vs_random_high", "vs_other", "vs_other_low", "vs_other_high", "loss_vs_random",
                 "loss_vs_other", "jaccard_other", "jaccard_random", "loss_vs_random_low", "loss_vs_random_high", "loss_vs_other_low",
                 "loss_vs_other_high", "vs_random_p_holm", "vs_other_p_holm"]
_FROM_SPECIFICITY = ["own_drop", "random_drop", "other_drop", "vs_random", "vs_random_low", "vs_random_high", "vs_other", "vs_other_low",
                     "vs_other_high", "loss_vs_random", "loss_vs_other", "loss_vs_random_low", "loss_vs_random_high", "loss_vs_other_low",
                     "loss_vs_other_high", "vs_random_p_holm", "vs_other_p_holm"]
SUMMARY_COLUMNS = ["method", "n_tasks", "n_above_chance", "own_gt_random", "own_gt_other", "own_gt_random_holm", "own_gt_other_holm",
                   "mean_vs_random", "mean_vs_other",
                   "mean_loss_vs_random", "mean_loss_vs_other", "mean_jaccard_other", "mean_jaccard_random", "mean_n_neurons"]


def mean_pairwise_jaccard(sets: Mapping[str, NeuronSet]) -> dict[str, float]:
    """Task → mean Jaccard overlap of its set with every other task's set (NaN with one task).

    Example:
        >>> mean_pairwise_jaccard({"a": NeuronSet(1, 4, {0: [0, 1]}), "b": NeuronSet(1, 4, {0: [1, 2]})})
        {'a': 0.3333333333333333, 'b': 0.3333333333333333}
    """
    out = {}
    for name, neurons in sets.items():
        values = [neurons.jaccard(other) for n, other in sets.items() if n != name]
        out[name] = float(np.mean(values)) if values else math.nan
    return out


def random_pairwise_jaccard(sets: Mapping[str, NeuronSet], seeds: Sequence[int]) -> dict[str, float]:
    """The chance level of :func:`mean_pairwise_jaccard`: the same for matched random sets, averaged over seeds.

    Seed ``s`` draws every task's random set independently (task ``i`` uses seed ``1000·s + i``).

    Example:
        >>> random_pairwise_jaccard({"a": NeuronSet(1, 4, {0: [0]}), "b": NeuronSet(1, 4, {0: [1]})}, [0, 1])  # doctest: +SKIP
    """
    names = list(sets)
    draws = [mean_pairwise_jaccard({n: sets[n].random_like(1000 * int(s) + i) for i, n in enumerate(names)}) for s in seeds]
    return {n: float(np.mean([d[n] for d in draws])) if draws else math.nan for n in names}


@dataclass
class SelectionComparison:
    """Result of :func:`compare_selections`.

    Attributes:
        table: One row per (method, task); see the module docstring for the columns.
        summary: One row per method: how many above-chance tasks have own > random / own > other with
            the interval above zero, and the mean differences and overlaps.
        verdict: One line: which method is most specific on this model (or that none is).
        matrices: method → its :class:`AblationMatrix`. selections: method → :class:`Selection` (not saved).
        meta: JSON-able settings (k, per_layer, seeds, mode, n evaluation examples per task).

    Example:
        >>> cmp.summary[["method", "own_gt_other", "mean_loss_vs_other"]]   # doctest: +SKIP
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    verdict: str
    matrices: dict[str, AblationMatrix]
    selections: dict[str, Selection] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SelectionComparison(methods={list(self.matrices)}, tasks={self.table['task'].nunique()})\n{self.verdict}"

    def save(self, folder: Union[str, os.PathLike]) -> list[Path]:
        """Write ``comparison.csv``, ``summary.csv``, ``comparison.json`` (verdict + meta) and ``matrix_<method>.json``.

        Example:
            >>> cmp.save("report/selection")   # doctest: +SKIP
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / "comparison.csv", folder / "summary.csv", folder / "comparison.json"]
        self.table.to_csv(files[0], index=False)
        self.summary.to_csv(files[1], index=False)
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "verdict": self.verdict, "meta": self.meta, "methods": list(self.matrices)}
        tmp = folder / ".comparison.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, files[2])
        for method, matrix in self.matrices.items():
            path = folder / f"matrix_{method}.json"
            matrix.save(path)
            files.append(path)
        return files

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> "SelectionComparison":
        """Read what :meth:`save` wrote (selections are not saved)."""
        folder = Path(folder)
        payload = json.loads((folder / "comparison.json").read_text())
        if payload.get("format") != FORMAT or payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / 'comparison.json'} is not a saved SelectionComparison of format version {FORMAT_VERSION}")
        matrices = {m: AblationMatrix.load(folder / f"matrix_{m}.json") for m in payload["methods"]}
        return cls(pd.read_csv(folder / "comparison.csv"), pd.read_csv(folder / "summary.csv"), payload["verdict"], matrices, {}, payload["meta"])


def _summarize(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method, group in table.groupby("method", sort=False):
        above = group[group["above_chance"]]
        rows.append({
            "method": method, "n_tasks": len(group), "n_above_chance": len(above),
            "own_gt_random": int((above["vs_random_low"] > 0).sum()), "own_gt_other": int((above["vs_other_low"] > 0).sum()),
            # Holm over the above-chance tasks (the family of the claim), one-sided in the claimed direction
            "own_gt_random_holm": int(((above["vs_random"] > 0) & (above["vs_random_p_holm"] < 0.05)).sum()),
            "own_gt_other_holm": int(((above["vs_other"] > 0) & (above["vs_other_p_holm"] < 0.05)).sum()),
            # averages only over tasks above chance (ablating anything can raise a below-chance task's accuracy)
            "mean_vs_random": above["vs_random"].mean(), "mean_vs_other": above["vs_other"].mean(),
            "mean_loss_vs_random": above["loss_vs_random"].mean(), "mean_loss_vs_other": above["loss_vs_other"].mean(),
            "mean_jaccard_other": group["jaccard_other"].mean(), "mean_jaccard_random": group["jaccard_random"].mean(),
            "mean_n_neurons": group["n_neurons"].mean(),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def verdict(summary: pd.DataFrame) -> str:
    """One line naming the most specific method (see the module docstring for the rule).

    Example:
        >>> verdict(pd.DataFrame([{"method": "a", "n_above_chance": 2, "own_gt_random": 1, "own_gt_other": 0, "mean_loss_vs_other": 0.5},
        ...                       {"method": "b", "n_above_chance": 2, "own_gt_random": 1, "own_gt_other": 1, "mean_loss_vs_other": 0.1}]))
        'most specific: b (own > other, interval above 0, for 1/2 above-chance tasks; own > random for 1/2); a: 0/2 and 1/2'
    """
    if summary.empty:
        return "no selection method was compared"
    loss = summary["mean_loss_vs_other"].fillna(-math.inf)
    order = summary.assign(_loss=loss).sort_values(["own_gt_other", "own_gt_random", "_loss"], ascending=False, kind="stable")
    best = order.iloc[0]
    n = int(best["n_above_chance"])
    if n == 0:
        ranked = ", ".join(f"{r.method} ({r.mean_loss_vs_other:+.2f})" for r in order.itertuples())
        return f"no task scored above chance, so no accuracy verdict; by own − other answer-loss increase (nats): {ranked}"
    if int(best["own_gt_other"]) == 0 and int(best["own_gt_random"]) == 0:
        ranked = ", ".join(f"{r.method} ({r.mean_loss_vs_other:+.2f})" for r in order.itertuples())
        return (f"no method gave own > random or own > other with an interval above 0 for any of {n} above-chance tasks; "
                f"by own − other answer-loss increase (nats): {ranked}")
    rest = "; ".join(f"{r.method}: {r.own_gt_other}/{r.n_above_chance} and {r.own_gt_random}/{r.n_above_chance}" for r in order.iloc[1:].itertuples())
    head = (f"most specific: {best['method']} (own > other, interval above 0, for {int(best['own_gt_other'])}/{n} above-chance tasks; "
            f"own > random for {int(best['own_gt_random'])}/{n})")
    return head + (f"; {rest}" if rest else "")


def compare_selections(
    model: Any,
    selection_tasks: TasksLike,
    evaluation_tasks: TasksLike,
    methods: Sequence[Union[str, ScoreFn]] = METHODS,
    *,
    k: float = 0.1,
    per_layer: bool = True,
    seeds: Union[int, Sequence[int]] = 3,
    mode: str = "zero",
    mean_activations: Optional[Any] = None,
    batch_size: int = 8,
    gradient_batch_size: Optional[int] = None,
    gradxact: Optional[Mapping[str, Any]] = None,
    matrices: Optional[Mapping[str, AblationMatrix]] = None,
    baselines: Optional[Mapping[str, Any]] = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    progress: bool = False,
) -> SelectionComparison:
    """Select each task's neurons with every method (selection split) and compare their ablations (evaluation split).

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter.
        selection_tasks, evaluation_tasks: The same tasks' selection and held-out examples.
        methods: Names from :data:`~tl_taskmap.neurons.selection.METHODS` and/or callables ``score_fn(model, suite)``.
        k, per_layer: Top-k rule. seeds: random sets per row (count or list). mode: ablation mode
            (``mean_activations`` for ``"mean"``, as :func:`~tl_taskmap.neurons.ablation_effects.ablation_matrix`).
        batch_size: Rows per forward pass. gradient_batch_size: Rows per forward + backward pass of the
            selection scores (default ``batch_size``; smaller keeps less memory).
        gradxact: Precomputed gradxact scores per task, reused. matrices: precomputed ablation matrices per
            method name (must match the sets, seeds and mode), reused. baselines: the unablated model's
            TaskScore per evaluation task, shared by every method's matrix (default: evaluated once here).
        n_boot, alpha: Bootstrap of the specificity intervals.

    Example:
        >>> cmp = compare_selections(model, sel, ev, ["gradxact", "exclusive"], seeds=3)   # doctest: +SKIP
        >>> print(cmp.verdict)                                                             # doctest: +SKIP
    """
    selection, evaluation = as_suite(selection_tasks), as_suite(evaluation_tasks)
    if set(selection.names) != set(evaluation.names):
        raise ValueError(f"selection and evaluation tasks differ: {sorted(set(selection.names) ^ set(evaluation.names))}")
    if len(selection) < 2:
        raise ValueError("comparing selection methods needs ≥ 2 tasks (own vs other sets)")
    seed_list = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    selections = select_all(model, selection, methods, k=k, per_layer=per_layer, batch_size=gradient_batch_size or batch_size,
                            gradxact=gradxact)
    chance = {t.name: t.chance for t in evaluation}
    done = dict(matrices or {})
    rows, out_matrices = [], {}
    for method, sel in selections.items():
        matrix = done.get(method)
        if matrix is None:
            if baselines is None:  # every method's matrix has the same unablated baselines: evaluate them once
                baselines = {t.name: evaluate_task(model, t, batch_size=batch_size) for t in evaluation}
            matrix = ablation_matrix(model, evaluation, sel.sets, seeds=seed_list, mode=mode,  # type: ignore[arg-type]
                                     mean_activations=mean_activations, batch_size=batch_size, progress=progress,
                                     baselines=baselines)
        out_matrices[method] = matrix
        spec = specificity(matrix, alpha=alpha).set_index("task")
        jac, jac_random = mean_pairwise_jaccard(sel.sets), random_pairwise_jaccard(sel.sets, seed_list or [0])
        for task in evaluation.names:
            s = spec.loc[task]
            base, ch = float(s["baseline"]), chance[task]
            rows.append({"method": method, "task": task, "metric": s["metric"], "baseline": base, "chance": ch,
                         # the exact one-sided binomial test of the ablation statistics (not a point comparison)
                         "above_chance": bool(s["above_chance"]) if not pd.isna(s["above_chance"]) else True,
                         "n_neurons": len(sel.sets[task]),
                         **{c: float(s[c]) for c in _FROM_SPECIFICITY}, "jaccard_other": jac[task], "jaccard_random": jac_random[task]})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    summary = _summarize(table)
    meta = {"k": k, "per_layer": per_layer, "seeds": seed_list, "mode": mode, "alpha": alpha, "n_boot": n_boot,
            "n_evaluation_examples": {t.name: len(t) for t in evaluation}, "n_selection_examples": {t.name: len(t) for t in selection},
            "intervals": "specificity(): crossed examples x random-seeds t-intervals (tl_taskmap.stats.inference), Holm over above-chance tasks"}
    return SelectionComparison(table, summary, verdict(summary), out_matrices, selections, meta)


def plot_selection_comparison(table: pd.DataFrame, value: str = "vs_other", ax: Any = None) -> Any:
    """Grouped bars: per task, each method's ``value`` (``vs_other`` or ``vs_random``) with its interval.

    Example:
        >>> ax = plot_selection_comparison(cmp.table)   # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if value not in ("vs_other", "vs_random"):
        raise ValueError(f"value must be 'vs_other' or 'vs_random', got {value!r}")
    methods, tasks = list(dict.fromkeys(table["method"])), list(dict.fromkeys(table["task"]))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tasks) * max(1, len(methods)) / 2 + 2), 3.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        mid = rows[value].to_numpy(float)
        err = np.vstack([mid - rows[f"{value}_low"].to_numpy(float), rows[f"{value}_high"].to_numpy(float) - mid])
        ax.bar(x, mid, width, label=method, yerr=np.nan_to_num(err), capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    label = "own − other" if value == "vs_other" else "own − random"
    ax.set_ylabel(f"extra metric drop ({label})")
    ax.legend(fontsize=8)
    return ax
