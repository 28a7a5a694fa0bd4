"""The task × task ablation matrix with matched random baselines, and its specificity summary.

Rows are ablated neuron sets (each task's set, and for each of them ``seeds`` random sets with the
same per-layer counts, the paper's "Deactivate-Random"), columns are evaluated tasks, cells are the
change of the task's metric (and answer loss) against the unablated model: Table 1 of Leng & Xiong
(2024) as a matrix. The baseline of each task is evaluated once; identical sets (e.g. random sets of
equal per-layer counts drawn with the same seed) are evaluated once and shared between rows.

Example:
    >>> from tl_taskmap.neurons.ablation_matrix import ablation_matrix, specificity
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
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.evaluate import TaskScore, evaluate_task
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.ablation import AblationMode, MODES, _check_means, ablate, check_neuron_set, paired_delta_interval
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite

FORMAT = "tl_taskmap.AblationMatrix"
FORMAT_VERSION = 1
COLUMNS = ["ablated_set", "kind", "seed", "evaluated_task", "metric", "baseline", "ablated", "delta", "loss_delta", "ci_low", "ci_high", "n_neurons"]


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


def _t_interval(values: Sequence[float], alpha: float) -> tuple[float, float]:
    if len(values) < 2:
        return (math.nan, math.nan)
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(1 - alpha / 2, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data))
    return (float(data.mean() - half), float(data.mean() + half))


class AblationMatrix:
    """Result of :func:`ablation_matrix`: every (ablated set, evaluated task) score and the baselines.

    Attributes:
        mode: The ablation mode. tasks: evaluated task names, in order. metrics: task → metric name.
        set_names: The task sets' names (row order). seeds: random seeds per row.
        baselines: task → ``{"metric_value", "loss", "per_example"}`` of the unablated model.
        records: one dict per (row, seed, task): ``ablated_set, kind, seed, evaluated_task,
            metric_value, loss, per_example, n_neurons``.
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
    def to_dataframe(self, per_seed: bool = True, *, n_boot: int = 1000, alpha: float = 0.05) -> pd.DataFrame:
        """Long table, one row per (ablated set, seed, evaluated task).

        Columns: ablated_set, kind (``"task"``/``"random"``), seed (<NA> for task rows), evaluated_task,
        metric, baseline, ablated, delta (ablated − baseline), loss_delta, ci_low, ci_high, n_neurons.
        The interval is a paired per-example bootstrap of delta. With ``per_seed=False`` the random
        seeds of a row are averaged into one cell whose interval is a t-interval over seeds.

        Example:
            >>> matrix.to_dataframe().query("kind == 'task'")   # doctest: +SKIP
        """
        return self._frame(per_seed, n_boot=n_boot, alpha=alpha, intervals=True)

    def _frame(self, per_seed: bool, *, n_boot: int, alpha: float, intervals: bool) -> pd.DataFrame:
        rows = []
        for r in self.records:
            base = self.baselines[r["evaluated_task"]]
            low, high = (math.nan, math.nan)
            if intervals:
                low, high = paired_delta_interval(base["per_example"], r["per_example"], n_boot=n_boot, alpha=alpha)
            rows.append({
                "ablated_set": r["ablated_set"], "kind": r["kind"], "seed": r["seed"], "evaluated_task": r["evaluated_task"],
                "metric": self.metrics[r["evaluated_task"]], "baseline": base["metric_value"], "ablated": r["metric_value"],
                "delta": r["metric_value"] - base["metric_value"], "loss_delta": r["loss"] - base["loss"],
                "ci_low": low, "ci_high": high, "n_neurons": r["n_neurons"],
            })
        df = pd.DataFrame(rows, columns=COLUMNS)
        df["seed"] = pd.array(df["seed"].tolist(), dtype="Int64")
        if per_seed or df.empty:
            return df
        keys = ["ablated_set", "kind", "evaluated_task"]
        cells = []
        for _, group in df.groupby(keys, sort=False):
            first = group.iloc[0].to_dict()
            if first["kind"] == "random":
                first.update(seed=pd.NA, ablated=group["ablated"].mean(), delta=group["delta"].mean(), loss_delta=group["loss_delta"].mean())
                first["ci_low"], first["ci_high"] = _t_interval(group["delta"].tolist(), alpha)
            cells.append(first)
        out = pd.DataFrame(cells, columns=COLUMNS)
        out["seed"] = pd.array(out["seed"].tolist(), dtype="Int64")
        return out

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
        if value not in COLUMNS[5:11]:
            raise ValueError(f"unknown value {value!r}; use one of {COLUMNS[5:11]}")
        cells = self._frame(False, n_boot=1000, alpha=0.05, intervals=value.startswith("ci_"))
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
        """Write JSON (with a format version; no pickle).

        Example:
            >>> matrix.save("ablation.json"); AblationMatrix.load("ablation.json")   # doctest: +SKIP
        """
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AblationMatrix":
        """Read a matrix written by :meth:`save`."""
        try:
            payload = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved AblationMatrix (no 'format': {FORMAT!r})")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version={payload.get('format_version')!r}; this tl_taskmap reads {FORMAT_VERSION}")
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
    **eval_kwargs: Any,
) -> AblationMatrix:
    """Ablate each set (and matched random sets) and score every task: the task × task ablation matrix.

    Cost: ``T`` baseline passes plus one pass per (distinct non-empty set, task), i.e. at most
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
    seed_list = _seed_list(seeds)
    rows: list[tuple[str, str, Optional[int], NeuronSet]] = [(str(n), "task", None, s) for n, s in neuron_sets.items()]
    for name, neurons in neuron_sets.items():
        rows += [(str(name), "random", seed, r) for seed, r in zip(seed_list, matched_random_sets(neurons, seed_list))]
    distinct = list(dict.fromkeys(s for *_, s in rows if len(s)))  # NeuronSet equality ignores names
    bar = tqdm(total=len(suite) * (1 + len(distinct)), disable=not progress, desc="ablation matrix", leave=False)
    kwargs = dict(batch_size=batch_size, **eval_kwargs)
    baselines: dict[str, TaskScore] = {}
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
                "loss": score.loss, "per_example": list(score.per_example), "n_neurons": len(neurons),
            })
    return AblationMatrix(
        mode=mode, tasks=suite.names, metrics={t.name: str(t.metric) for t in suite}, set_names=[str(n) for n in neuron_sets],
        seeds=seed_list,
        baselines={n: {"metric_value": s.metric_value, "loss": s.loss, "per_example": list(s.per_example)} for n, s in baselines.items()},
        records=records, meta={"n_evaluations": len(suite) * (1 + len(distinct)), "batch_size": batch_size, "unit": units.pop()},
    )


def specificity(matrix: AblationMatrix, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Per task: how much more its own neurons matter than random neurons and other tasks' neurons.

    A drop is ``baseline − ablated`` (positive: worse). For each evaluated task ``t`` with a set of
    the same name: ``own_drop`` (ablating ``t``'s set), ``random_drop`` (mean over the matched random
    sets), ``other_drop`` (mean over the sets named after the other evaluated tasks), and
    ``vs_random = own_drop − random_drop``, ``vs_other = own_drop − other_drop``. Intervals are a
    bootstrap resampling examples (paired across rows) and, for the random term, seeds.
    ``loss_vs_random`` / ``loss_vs_other`` are the same differences of loss increases (no interval).

    Example:
        >>> specificity(matrix)[["task", "vs_random", "vs_random_low", "vs_random_high"]]   # doctest: +SKIP
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for task in matrix.tasks:
        if task not in matrix.set_names:
            continue
        base = matrix.baselines[task]
        here = [r for r in matrix.records if r["evaluated_task"] == task]
        own = [r for r in here if r["kind"] == "task" and r["ablated_set"] == task]
        rand = [r for r in here if r["kind"] == "random" and r["ablated_set"] == task]
        other = [r for r in here if r["kind"] == "task" and r["ablated_set"] != task and r["ablated_set"] in matrix.tasks]
        b = torch.tensor(base["per_example"], dtype=torch.float64)

        def drops(rs: list[dict[str, Any]]) -> Tensor:
            return b - torch.tensor([r["per_example"] for r in rs], dtype=torch.float64).reshape(len(rs), len(b))

        own_d, rand_d, other_d = drops(own), drops(rand), drops(other)
        idx = torch.randint(0, len(b), (n_boot, len(b)), generator=gen)
        own_b = own_d[0][idx].mean(1)
        row: dict[str, Any] = {"task": task, "metric": matrix.metrics[task], "baseline": base["metric_value"],
                               "own_drop": float(own_d.mean())}
        for label, d in (("random", rand_d), ("other", other_d)):
            if len(d) == 0:
                row.update({f"{label}_drop": math.nan, f"vs_{label}": math.nan, f"vs_{label}_low": math.nan, f"vs_{label}_high": math.nan})
                continue
            per_row = d[:, idx].mean(-1)  # [rows, n_boot]
            if label == "random":  # random sets are a sample: resample them too
                pick = torch.randint(0, len(d), (n_boot, len(d)), generator=gen)
                term = per_row.T.gather(1, pick).mean(1)
            else:
                term = per_row.mean(0)
            diff = own_b - term
            row[f"{label}_drop"] = float(d.mean())
            row[f"vs_{label}"] = row["own_drop"] - row[f"{label}_drop"]
            row[f"vs_{label}_low"] = float(torch.quantile(diff, alpha / 2))
            row[f"vs_{label}_high"] = float(torch.quantile(diff, 1 - alpha / 2))
        # (own loss − baseline) − (mean loss − baseline): the baseline cancels.
        row["loss_vs_random"] = own[0]["loss"] - float(np.mean([r["loss"] for r in rand])) if rand else math.nan
        row["loss_vs_other"] = own[0]["loss"] - float(np.mean([r["loss"] for r in other])) if other else math.nan
        out.append(row)
    columns = ["task", "metric", "baseline", "own_drop", "random_drop", "other_drop", "vs_random", "vs_random_low", "vs_random_high",
               "vs_other", "vs_other_low", "vs_other_high", "loss_vs_random", "loss_vs_other"]
    return pd.DataFrame(out, columns=columns)


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
