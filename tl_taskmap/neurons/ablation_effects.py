"""The task × task ablation matrix with matched random baselines, and its specificity summary.

Rows are ablated neuron sets (each task's set, and for each of them ``seeds`` random sets with the
same per-layer counts, the paper's "Deactivate-Random"), columns are evaluated tasks, cells are the
change of the task's metric (and answer loss) against the unablated model: Table 1 of Leng & Xiong
(2024) as a matrix. The baseline of each task is evaluated once; identical sets (e.g. random sets of
equal per-layer counts drawn with the same seed) are evaluated once and shared between rows.

Every evaluation keeps its per-example scores, answer losses and per-option scores (saved with the
matrix), so every interval — of the metric and of the loss — is computed from examples, and random
rows are treated as a sample of random sets: the tests are those of :mod:`tl_taskmap.stats.inference`
(crossed examples × seeds t-interval; exact binomial test for "above chance"; Holm over tasks).

Example:
    >>> from tl_taskmap.neurons.ablation_effects import ablation_matrix, specificity
    >>> matrix = ablation_matrix(model, suite, {"sst2": s1, "qqp": s2}, seeds=5)   # doctest: +SKIP
    >>> matrix.delta_table()                                                        # doctest: +SKIP
    >>> specificity(matrix)                                                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.evaluate import TaskScore, evaluate_task
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.ablation import AblationMode, MODES, _check_means, ablate, check_neuron_set
from tl_taskmap.neurons.ablation_stats import (  # noqa: F401 - re-exported: the tests behind specificity()
    COMPARISONS,
    SPECIFICITY_COLUMNS,
    above_chance_tests,
    interval_bounds,
    paired_effect,
    per_example_array,
    specificity_effects,
    specificity_table,
)
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite
from tl_taskmap.state_io import FORMAT_VERSIONS

FORMAT = "tl_taskmap.AblationMatrix"
FORMAT_VERSION = FORMAT_VERSIONS["ablation_matrix"]  # 2: per-example answer losses and option scores, chance per task; version 1 still loads
READABLE_VERSIONS = (1, 2)
COLUMNS = ["ablated_set", "kind", "seed", "evaluated_task", "metric", "baseline", "ablated", "delta", "loss_delta", "ci_low", "ci_high", "n_neurons",
           "p_value", "n_examples", "n_changed", "loss_ci_low", "loss_ci_high"]


def matched_random_sets(neurons: NeuronSet, seeds: Sequence[int]) -> list[NeuronSet]:
    """One random set per seed with exactly ``neurons``'s per-layer counts (``random_like(seed)``).

    Example:
        >>> [r.counts_per_layer() for r in matched_random_sets(NeuronSet(2, 8, {0: [1, 2]}), [0, 1])]
        [[2, 0], [2, 0]]
    """
    return [neurons.random_like(int(seed)).with_name(f"random({neurons.name})") for seed in seeds]


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 0:
            raise ValueError(f"seeds must be ≥ 0 (the number of random sets per row), got {seeds}")
        return list(range(int(seeds)))
    out = [int(s) for s in seeds]
    if len(set(out)) != len(out) or any(s < 0 for s in out):
        raise ValueError(f"seeds must be distinct non-negative integers, got {out}")
    return out


class AblationMatrix:
    """Result of :func:`ablation_matrix`: every (ablated set, evaluated task) score and the baselines.

    Attributes:
        mode: The ablation mode. tasks: evaluated task names, in order. metrics: task → metric name.
        set_names: The task sets' names (row order). seeds: random seeds per row.
        baselines: task → ``{"metric_value", "loss", "per_example", "losses", "option_scores", "chance", "n"}``
            of the unablated model (``losses``: answer NLL per example; ``option_scores``: per example, each
            option's score; ``chance``: chance accuracy or None).
        records: one dict per (row, seed, task): ``ablated_set, kind, seed, evaluated_task,
            metric_value, loss, per_example, losses, option_scores, n_neurons``.
        meta: JSON-able extras (e.g. ``n_evaluations`` actually run).

    Example:
        >>> matrix.to_dataframe(per_seed=False)   # doctest: +SKIP
        >>> matrix.plot()                          # doctest: +SKIP
    """

    def __init__(self, *, mode: str, tasks: Sequence[str], metrics: Mapping[str, str], set_names: Sequence[str],
                 seeds: Sequence[int], baselines: Mapping[str, Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                 meta: Optional[Mapping[str, Any]] = None):
        self.mode = mode
        self.tasks = list(tasks)
        self.metrics = dict(metrics)
        self.set_names = list(set_names)
        self.seeds = [int(s) for s in seeds]
        self.baselines = {k: dict(v) for k, v in baselines.items()}
        self.records = [dict(r) for r in records]
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ tables
    def to_dataframe(self, per_seed: bool = True, *, alpha: float = 0.05) -> pd.DataFrame:
        """Long table, one row per (ablated set, seed, evaluated task).

        Columns: ablated_set, kind (``"task"``/``"random"``), seed (<NA> for task rows), evaluated_task,
        metric, baseline, ablated, delta (ablated − baseline), loss_delta, ci_low, ci_high, n_neurons,
        p_value (of delta = 0), n_examples, n_changed (examples whose score changed), loss_ci_low,
        loss_ci_high. Intervals are paired t-intervals over examples; with ``per_seed=False`` the random
        seeds of a row are averaged into one cell whose interval is the crossed examples × seeds
        interval (:func:`~tl_taskmap.stats.inference.crossed_effect`). Where no example's score changed
        the interval is NaN (not a zero-width interval) and ``n_changed`` is 0.

        Example:
            >>> matrix.to_dataframe().query("kind == 'task'")   # doctest: +SKIP
        """
        return self._frame(per_seed, alpha=alpha, intervals=True)

    def _frame(self, per_seed: bool, *, alpha: float, intervals: bool) -> pd.DataFrame:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for i, r in enumerate(self.records):
            key = (i,) if per_seed or r["kind"] != "random" else (r["ablated_set"], r["kind"], r["evaluated_task"])
            groups.setdefault(key, []).append(r)
        rows = [self._cell(group, alpha, intervals) for group in groups.values()]
        df = pd.DataFrame(rows, columns=COLUMNS)
        df["seed"] = pd.array(df["seed"].tolist(), dtype="Int64")
        return df

    def _cell(self, group: list[dict[str, Any]], alpha: float, intervals: bool) -> dict[str, Any]:
        """One table cell: the records of one (set, kind, task) — several seeds for an averaged random row."""
        first, task = group[0], group[0]["evaluated_task"]
        base = self.baselines[task]
        ablated, loss = float(np.mean([r["metric_value"] for r in group])), float(np.mean([r["loss"] for r in group]))
        cell = {"ablated_set": first["ablated_set"], "kind": first["kind"], "seed": first["seed"] if len(group) == 1 else pd.NA,
                "evaluated_task": task, "metric": self.metrics[task], "baseline": base["metric_value"], "ablated": ablated,
                "delta": ablated - base["metric_value"], "loss_delta": loss - base["loss"], "n_neurons": first["n_neurons"],
                "n_examples": len(base["per_example"])}
        if intervals:
            random_rows = first["kind"] == "random"
            metric = paired_effect(per_example_array(group, "per_example"), per_example_array([base], "per_example"), random_rows=random_rows,
                             bounded=True, alpha=alpha)
            losses = paired_effect(per_example_array(group, "losses"), per_example_array([base], "losses"), random_rows=random_rows,
                             bounded=False, alpha=alpha)
            cell["ci_low"], cell["ci_high"] = interval_bounds(metric)
            cell["loss_ci_low"], cell["loss_ci_high"] = interval_bounds(losses)
            cell["p_value"] = metric.p_value if metric is not None else math.nan
            cell["n_changed"] = metric.n_differing if metric is not None else pd.NA
        return cell

    def row_labels(self) -> list[str]:
        """Row labels of :meth:`delta_table`: the task sets, then ``random(<set>)`` rows."""
        return self.set_names + ([f"random({n})" for n in self.set_names] if self.seeds else [])

    def delta_table(self, value: str = "delta") -> pd.DataFrame:
        """Pivot: rows = ablated sets (random rows averaged over seeds), columns = evaluated tasks.

        Args:
            value: ``"delta"`` (metric change), ``"loss_delta"``, ``"ablated"``, ``"ci_low"`` or ``"ci_high"``.

        Example:
            >>> matrix.delta_table().round(3)   # doctest: +SKIP
        """
        values = COLUMNS[5:11] + ["p_value", "loss_ci_low", "loss_ci_high"]
        if value not in values:
            raise ValueError(f"unknown value {value!r}; use one of {values}")
        cells = self._frame(False, alpha=0.05, intervals=value.startswith(("ci_", "loss_ci_", "p_")))
        cells = cells.assign(row=[n if k == "task" else f"random({n})" for n, k in zip(cells["ablated_set"], cells["kind"])])
        table = cells.pivot(index="row", columns="evaluated_task", values=value)
        table = table.reindex(index=self.row_labels(), columns=self.tasks)
        table.index.name, table.columns.name = "ablated_set", "evaluated_task"
        return table

    # ------------------------------------------------------------------ views
    def specificity(self, **kwargs: Any) -> pd.DataFrame:
        """Shortcut for :func:`specificity`."""
        return specificity(self, **kwargs)

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Heat map of the delta table; see :func:`plot_ablation_matrix`."""
        return plot_ablation_matrix(self, ax=ax, **kwargs)

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import ablation_html

        return ablation_html(self)

    def __repr__(self) -> str:
        head = (
            f"AblationMatrix(mode={self.mode!r}, tasks={self.tasks}, sets={self.set_names}, seeds={len(self.seeds)}, "
            f"cells={len(self.records)})"
        )
        if len(self.tasks) > 8:
            return head
        table = self.delta_table().round(3).to_string()
        return f"{head}\nmetric change (ablated − baseline):\n{table}"

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "mode": self.mode, "tasks": self.tasks, "metrics": self.metrics,
            "set_names": self.set_names, "seeds": self.seeds, "baselines": self.baselines, "records": self.records, "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON (with a format version; no pickle), atomically (a temporary file, then a rename).

        Example:
            >>> matrix.save("ablation.json"); AblationMatrix.load("ablation.json")   # doctest: +SKIP
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AblationMatrix":
        """Read a matrix written by :meth:`save`."""
        try:
            payload = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved AblationMatrix (no 'format': {FORMAT!r})")
        if payload.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{path} has format_version={payload.get('format_version')!r}; this tl_taskmap reads "
                             f"{list(READABLE_VERSIONS)} (re-run the ablation stage to rewrite it)")
        return cls(**{k: payload[k] for k in ("mode", "tasks", "metrics", "set_names", "seeds", "baselines", "records", "meta")})


def ablation_matrix(
    model: Any,
    tasks: Task | Sequence[Task] | TaskSuite,
    neuron_sets: Mapping[str, NeuronSet],
    *,
    seeds: int | Sequence[int] = 5,
    mode: AblationMode = "zero",
    mean_activations: Optional[Float[Tensor, "n_layers d_mlp"]] = None,
    batch_size: int = 8,
    progress: bool = True,
    baselines: Optional[Mapping[str, TaskScore]] = None,
    **eval_kwargs: Any,
) -> AblationMatrix:
    """Ablate each set (and matched random sets) and score every task: the task × task ablation matrix.

    Cost: ``T`` baseline passes (none when ``baselines`` are given) plus one pass per (distinct non-empty
    set, task), i.e. at most
    ``(S + S·seeds) × T`` ablated passes for ``S`` sets and ``T`` tasks. Random sets are
    ``neuron_sets[name].random_like(seed)`` (the same per-layer counts; they may overlap the task's set,
    as in the paper). Every set is validated against the model before anything runs.

    Args:
        model: A HookedTransformer, TransformerBridge or ModelAdapter.
        tasks: The evaluated tasks (columns).
        neuron_sets: Name → set (rows); name sets after tasks for :func:`specificity`. All
            :class:`~tl_taskmap.neurons.sets.NeuronSet` or all :class:`~tl_taskmap.neurons.sets.HeadSet`
            (then ``mean_activations`` is ``[n_layers, n_heads, d_head]`` and ``n_neurons`` counts heads).
        seeds: Number of random sets per row (seeds ``0..n-1``) or an explicit list of seeds; 0 for none.
        mode: ``"zero"``, ``"mean"`` or ``"params"`` (see :func:`~tl_taskmap.neurons.ablation.ablate`).
        mean_activations: Needed for ``mode="mean"``.
        batch_size: Rows per forward pass. progress: show a progress bar.
        baselines: Task name → the unablated model's :class:`~tl_taskmap.evaluate.TaskScore` on that task,
            evaluated with the same settings (e.g. a report's baseline stage); the baseline passes are then skipped.
        **eval_kwargs: Passed to :func:`~tl_taskmap.evaluate.evaluate_task` (``scoring``, ``max_new_tokens``, ...).

    Example:
        >>> matrix = ablation_matrix(model, [sst2, qqp], {"sst2": sets["sst2"], "qqp": sets["qqp"]}, seeds=5)   # doctest: +SKIP
        >>> matrix.delta_table()                                                                            # doctest: +SKIP
    """
    suite = as_suite(tasks)
    adapter = as_adapter(model)
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}: use one of {MODES}")
    if not neuron_sets:
        raise ValueError("neuron_sets is empty: pass {name: NeuronSet}, e.g. each task's top-k% neurons")
    for name, neurons in neuron_sets.items():
        try:
            check_neuron_set(adapter, neurons)
        except (TypeError, ValueError) as err:
            raise type(err)(f"neuron_sets[{name!r}]: {err}") from None
    units = {s.unit for s in neuron_sets.values()}
    if len(units) > 1:
        raise ValueError(f"neuron_sets mixes unit kinds {sorted(units)}: build one matrix per kind (neurons, heads)")
    if mode == "mean" and units == {"head"}:
        from tl_taskmap.neurons.head_ablation import check_head_means

        check_head_means(adapter, mean_activations)
    elif mode == "mean":
        _check_means(adapter, mean_activations)
    given = _check_baselines(baselines, suite)
    seed_list = _seed_list(seeds)
    rows: list[tuple[str, str, Optional[int], NeuronSet]] = [(str(n), "task", None, s) for n, s in neuron_sets.items()]
    for name, neurons in neuron_sets.items():
        rows += [(str(name), "random", seed, r) for seed, r in zip(seed_list, matched_random_sets(neurons, seed_list))]
    distinct = list(dict.fromkeys(s for *_, s in rows if len(s)))  # NeuronSet equality ignores names
    n_evaluations = len(suite) * (len(distinct) + (given is None))
    bar = tqdm(total=n_evaluations, disable=not progress, desc="ablation matrix", leave=False)
    kwargs = dict(batch_size=batch_size, **eval_kwargs)
    baselines = dict(given or {})
    if given is None:
        for task in suite:
            baselines[task.name] = evaluate_task(adapter, task, **kwargs)
            bar.update()
    scores: dict[NeuronSet, dict[str, TaskScore]] = {}
    for neurons in distinct:
        with ablate(adapter, neurons, mode, mean_activations=mean_activations):
            scores[neurons] = {}
            for task in suite:
                scores[neurons][task.name] = evaluate_task(adapter, task, **kwargs)
                bar.update()
    bar.close()
    records = []
    for name, kind, seed, neurons in rows:
        for task in suite:
            score = scores[neurons][task.name] if len(neurons) else baselines[task.name]  # empty set: exact no-op
            records.append({
                "ablated_set": name, "kind": kind, "seed": seed, "evaluated_task": task.name, "metric_value": score.metric_value,
                "loss": score.loss, **_per_example_fields(score), "n_neurons": len(neurons),
            })
    return AblationMatrix(
        mode=mode, tasks=suite.names, metrics={t.name: str(t.metric) for t in suite}, set_names=[str(n) for n in neuron_sets],
        seeds=seed_list,
        baselines={n: {"metric_value": s.metric_value, "loss": s.loss, **_per_example_fields(s), "chance": s.chance, "n": s.n}
                   for n, s in baselines.items()},
        records=records, meta={"n_evaluations": n_evaluations, "baselines_given": given is not None, "batch_size": batch_size,
                               "unit": units.pop()},
    )


def _check_baselines(baselines: Optional[Mapping[str, TaskScore]], suite: TaskSuite) -> Optional[dict[str, TaskScore]]:
    """Given baselines, checked to be scores of exactly these tasks (names, metrics, example counts)."""
    if baselines is None:
        return None
    missing = [t.name for t in suite if t.name not in baselines]
    if missing:
        raise ValueError(f"baselines has no score for tasks {missing}; give one TaskScore per evaluated task (or baselines=None)")
    for task in suite:
        score = baselines[task.name]
        same_task = isinstance(score, TaskScore) and score.task == task.name and score.metric == str(task.metric)
        if not same_task or score.n != len(task) or len(score.per_example) != len(task):
            raise ValueError(f"baselines[{task.name!r}] is not a score of this task ({len(task)} examples, metric {task.metric}): "
                             f"got {score!r}; evaluate the unablated model on the same task, or pass baselines=None")
    return {t.name: baselines[t.name] for t in suite}


def _per_example_fields(score: TaskScore) -> dict[str, Any]:
    """The per-example parts of an evaluation that the matrix keeps (JSON-able lists, float64 precision)."""
    return {"per_example": [float(v) for v in score.per_example], "losses": [float(v) for v in score.losses],
            "option_scores": [[float(v) for v in row] for row in score.option_scores]}


def specificity(matrix: AblationMatrix, *, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    return specificity_table(matrix, alpha=alpha, power=power)


# One text for both names: the columns are documented where they are computed.
specificity.__doc__ = specificity_table.__doc__


def plot_ablation_matrix(matrix: AblationMatrix, ax: Any = None, *, value: str = "delta", annotate: bool = True, cmap: str = "RdBu") -> Any:
    """Heat map of :meth:`AblationMatrix.delta_table`, centred on 0 (red: the ablation hurts).

    Returns the matplotlib Axes.

    Example:
        >>> ax = plot_ablation_matrix(matrix)   # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    table = matrix.delta_table(value)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.9 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    values = table.to_numpy(dtype=float)
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    if value == "loss_delta":
        cmap = cmap + "_r" if not cmap.endswith("_r") else cmap[:-2]  # a loss increase hurts: red too
    image = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(table.shape[1]), list(table.columns), rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), list(table.index))
    ax.set_xlabel("evaluated task")
    ax.set_ylabel(f"ablated {matrix.meta.get('unit', 'neuron')}s")
    if matrix.seeds and matrix.set_names:
        ax.axhline(len(matrix.set_names) - 0.5, color="black", linewidth=1)
    if annotate and values.size <= 400:
        from tl_taskmap.plots import text_colour

        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):  # white on dark cells, black on light ones (also readable printed in greyscale)
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8, color=text_colour(image.cmap(image.norm(v))))
    label = {"delta": "metric change", "loss_delta": "loss change"}.get(value, value)
    ax.set_title(f"ablation mode: {matrix.mode}", fontsize="medium")
    ax.figure.colorbar(image, ax=ax, label=f"{label}\n(ablated − baseline)")  # two short lines: never clipped
    return ax
