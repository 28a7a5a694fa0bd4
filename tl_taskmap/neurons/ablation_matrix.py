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
from tl_taskmap.neurons.ablation import AblationMode, MODES, _check_means, ablate, check_neuron_set
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.stats.inference import Effect, above_chance_table, crossed_effect, crossed_intervals, holm, minimum_detectable_drop
from tl_taskmap.tasks import Task, TaskSuite, as_suite

FORMAT = "tl_taskmap.AblationMatrix"
FORMAT_VERSION = 2  # 2: per-example answer losses and option scores, chance per task; version 1 still loads
READABLE_VERSIONS = (1, 2)
COLUMNS = ["ablated_set", "kind", "seed", "evaluated_task", "metric", "baseline", "ablated", "delta", "loss_delta", "ci_low", "ci_high", "n_neurons",
           "p_value", "n_examples", "n_changed", "loss_ci_low", "loss_ci_high"]
#: Metrics whose per-example values are 0/1 (the minimum detectable drop is computed for these).
BINARY_METRICS = ("accuracy", "exact_match")


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


def _per_example(records: Sequence[Mapping[str, Any]], key: str) -> Optional[np.ndarray]:
    """``[rows, examples]`` float64 array of ``key`` (``per_example`` or ``losses``); None if any record lacks it."""
    if any(not r.get(key) for r in records):
        return None
    return np.asarray([r[key] for r in records], dtype=np.float64)


def _effect(ablated: Optional[np.ndarray], reference: Optional[np.ndarray], *, random_rows: bool, bounded: bool,
            alpha: float) -> Optional[Effect]:
    """Effect of ``ablated − reference`` per example (``reference`` broadcasts over rows); None without data."""
    if ablated is None or reference is None or ablated.shape[-1] < 2:
        return None
    return crossed_effect(ablated - reference, alpha=alpha, random_rows=random_rows, bounded=bounded)


def _bounds(effect: Optional[Effect]) -> tuple[float, float]:
    return (effect.low, effect.high) if effect is not None else (math.nan, math.nan)


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
            metric = _effect(_per_example(group, "per_example"), _per_example([base], "per_example"), random_rows=random_rows,
                             bounded=True, alpha=alpha)
            losses = _effect(_per_example(group, "losses"), _per_example([base], "losses"), random_rows=random_rows,
                             bounded=False, alpha=alpha)
            cell["ci_low"], cell["ci_high"] = _bounds(metric)
            cell["loss_ci_low"], cell["loss_ci_high"] = _bounds(losses)
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
        neuron_sets: Name → set (rows); name sets after tasks for :func:`specificity`.
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
    if mode == "mean":
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
                "loss": score.loss, **_per_example_fields(score), "n_neurons": len(neurons),
            })
    return AblationMatrix(
        mode=mode, tasks=suite.names, metrics={t.name: str(t.metric) for t in suite}, set_names=[str(n) for n in neuron_sets],
        seeds=seed_list,
        baselines={n: {"metric_value": s.metric_value, "loss": s.loss, **_per_example_fields(s), "chance": s.chance, "n": s.n}
                   for n, s in baselines.items()},
        records=records, meta={"n_evaluations": len(suite) * (1 + len(distinct)), "batch_size": batch_size},
    )


def _per_example_fields(score: TaskScore) -> dict[str, Any]:
    """The per-example parts of an evaluation that the matrix keeps (JSON-able lists, float64 precision)."""
    return {"per_example": [float(v) for v in score.per_example], "losses": [float(v) for v in score.losses],
            "option_scores": [[float(v) for v in row] for row in score.option_scores]}


SPECIFICITY_COLUMNS = [
    "task", "metric", "baseline", "own_drop", "random_drop", "other_drop", "vs_random", "vs_random_low", "vs_random_high",
    "vs_other", "vs_other_low", "vs_other_high", "loss_vs_random", "loss_vs_other",
    # added with format 2: the tests behind each number
    "n", "n_seeds", "chance", "p_above_chance", "p_above_chance_holm", "above_chance", "own_changed",
    "vs_random_p", "vs_random_p_holm", "vs_random_changed", "vs_other_p", "vs_other_p_holm", "vs_other_changed",
    "loss_vs_random_low", "loss_vs_random_high", "loss_vs_random_p", "loss_vs_random_p_holm",
    "loss_vs_other_low", "loss_vs_other_high", "loss_vs_other_p", "loss_vs_other_p_holm",
    "random_flip_rate", "mde_80",
]
COMPARISONS = ("vs_random", "vs_other", "loss_vs_random", "loss_vs_other")


def above_chance_tests(matrix: AblationMatrix, *, alpha: float = 0.05) -> pd.DataFrame:
    """Exact one-sided binomial test of each task's unablated accuracy against chance, Holm-adjusted over tasks.

    Columns: task, n, n_correct, chance, p_above_chance, p_above_chance_holm, above_chance (``<NA>``
    where the task has no chance level, e.g. generation tasks, or the matrix predates format 2).

    Example:
        >>> above_chance_tests(matrix)[["task", "p_above_chance_holm", "above_chance"]]   # doctest: +SKIP
    """
    rows = [{"task": task, "metric": matrix.metrics[task], "metric_value": float(np.mean(matrix.baselines[task]["per_example"])),
             "n": len(matrix.baselines[task]["per_example"]), "chance": matrix.baselines[task].get("chance")} for task in matrix.tasks]
    frame = above_chance_table(pd.DataFrame(rows, columns=["task", "metric", "metric_value", "n", "chance"]), alpha=alpha)
    return frame[["task", "n", "n_correct", "chance", "p_above_chance", "p_above_chance_holm", "above_chance"]]


def specificity_effects(matrix: AblationMatrix, *, alpha: float = 0.05) -> dict[str, dict[str, Optional[Effect]]]:
    """Task → ``{"vs_random", "vs_other", "loss_vs_random", "loss_vs_other"}`` → :class:`~tl_taskmap.stats.inference.Effect`.

    ``vs_random``: (own drop − random drop) of the metric, per example ``random_s(x) − own(x)``, with
    the crossed examples × seeds interval (the random sets are a sample). ``vs_other``: the same against
    the other tasks' sets (fixed rows: a paired t-interval over examples). ``loss_*``: the same for the
    answer loss, ``own(x) − random_s(x)`` (positive: the own set raises the loss more). None where the
    comparison has no rows (or, for losses, a format-1 matrix without per-example losses).

    Example:
        >>> specificity_effects(matrix)["sst2"]["vs_random"]   # doctest: +SKIP
        Effect(+0.212 [+0.120, +0.305], p=0.000114, n=80, rows=5, crossed examples × 5 random rows, Satterthwaite t)
    """
    out: dict[str, dict[str, Optional[Effect]]] = {}
    for task in matrix.tasks:
        if task not in matrix.set_names:
            continue
        here = [r for r in matrix.records if r["evaluated_task"] == task]
        own = [r for r in here if r["kind"] == "task" and r["ablated_set"] == task][:1]
        groups = {"random": [r for r in here if r["kind"] == "random" and r["ablated_set"] == task],
                  "other": [r for r in here if r["kind"] == "task" and r["ablated_set"] != task and r["ablated_set"] in matrix.tasks]}
        effects: dict[str, Optional[Effect]] = {}
        for label, rows in groups.items():
            random_rows = label == "random"
            # Metric: drop(own) − drop(row) = row(x) − own(x). Loss: rise(own) − rise(row) = own(x) − row(x).
            effects[f"vs_{label}"] = _effect(_per_example(rows, "per_example"), _per_example(own, "per_example"),
                                             random_rows=random_rows, bounded=True, alpha=alpha) if rows else None
            own_l, rows_l = _per_example(own, "losses"), _per_example(rows, "losses")
            effects[f"loss_vs_{label}"] = (crossed_effect(own_l - rows_l, alpha=alpha, random_rows=random_rows, bounded=False)
                                           if rows and own_l is not None and rows_l is not None and own_l.shape[-1] > 1 else None)
        out[task] = effects
    return out


def specificity(matrix: AblationMatrix, *, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Per task: how much more its own neurons matter than random neurons and other tasks' neurons, with tests.

    A drop is ``baseline − ablated`` (positive: worse). For each evaluated task ``t`` with a set of
    the same name: ``own_drop`` (ablating ``t``'s set), ``random_drop`` (mean over the matched random
    sets), ``other_drop`` (mean over the sets named after the other evaluated tasks), and
    ``vs_random = own_drop − random_drop``, ``vs_other = own_drop − other_drop``, each with a
    ``1 − alpha`` interval, a p-value and the Holm-adjusted p-value over the tasks that are above
    chance (see :func:`specificity_effects` for the intervals). ``loss_vs_random`` / ``loss_vs_other``
    are the same differences of answer-loss increases, with the same intervals.

    Also: ``n`` (evaluation examples), ``n_seeds``, the above-chance test of the baseline
    (:func:`above_chance_tests`; a task that is not above chance is flagged ``above_chance=False`` and
    left out of the Holm families), ``own_changed`` / ``vs_*_changed`` (examples whose score the own
    set changes / that differ between own and comparison rows: 0 means no prediction flipped, and the
    interval is NaN rather than ``[0, 0]``), ``random_flip_rate`` (share of right answers a random set
    turns wrong) and ``mde_80``: the smallest own-vs-random accuracy drop this run detects with
    ``power`` (:func:`~tl_taskmap.stats.inference.minimum_detectable_drop` at the task's ``n``,
    seeds, baseline accuracy, random flip rate and between-seed spread; 0/1 metrics only).

    Example:
        >>> specificity(matrix)[["task", "vs_random", "vs_random_low", "vs_random_high", "vs_random_p_holm"]]   # doctest: +SKIP
    """
    chance = above_chance_tests(matrix, alpha=alpha).set_index("task")
    effects = specificity_effects(matrix, alpha=alpha)
    out = []
    for task, eff in effects.items():
        base = matrix.baselines[task]
        b = np.asarray(base["per_example"], dtype=np.float64)
        here = [r for r in matrix.records if r["evaluated_task"] == task]
        own = [r for r in here if r["kind"] == "task" and r["ablated_set"] == task]
        rand = [r for r in here if r["kind"] == "random" and r["ablated_set"] == task]
        other = [r for r in here if r["kind"] == "task" and r["ablated_set"] != task and r["ablated_set"] in matrix.tasks]
        mean_drop = (lambda rs: float(np.mean([b.mean() - np.mean(r["per_example"]) for r in rs])) if rs else math.nan)
        above = chance.loc[task, "above_chance"]
        row: dict[str, Any] = {
            "task": task, "metric": matrix.metrics[task], "baseline": base["metric_value"], "own_drop": mean_drop(own),
            "random_drop": mean_drop(rand), "other_drop": mean_drop(other), "n": len(b), "n_seeds": len(rand),
            "chance": chance.loc[task, "chance"], "p_above_chance": chance.loc[task, "p_above_chance"],
            "p_above_chance_holm": chance.loc[task, "p_above_chance_holm"], "above_chance": above,
            "own_changed": int(np.count_nonzero(np.asarray(own[0]["per_example"]) != b)) if own else pd.NA,
        }
        row["vs_random"], row["vs_other"] = row["own_drop"] - row["random_drop"], row["own_drop"] - row["other_drop"]
        row["loss_vs_random"] = own[0]["loss"] - float(np.mean([r["loss"] for r in rand])) if own and rand else math.nan
        row["loss_vs_other"] = own[0]["loss"] - float(np.mean([r["loss"] for r in other])) if own and other else math.nan
        for comparison in COMPARISONS:
            effect = eff[comparison]
            row[f"{comparison}_low"], row[f"{comparison}_high"] = _bounds(effect)
            row[f"{comparison}_p"] = effect.p_value if effect is not None else math.nan
            if not comparison.startswith("loss"):
                row[f"{comparison}_changed"] = effect.n_differing if effect is not None else pd.NA
        row["random_flip_rate"], row["mde_80"] = _power(matrix.metrics[task], b, rand, own, eff["vs_random"], alpha, power)
        out.append(row)
    frame = pd.DataFrame(out, columns=SPECIFICITY_COLUMNS)
    frame["above_chance"] = pd.array(frame["above_chance"].tolist(), dtype="boolean")
    included = ~frame["above_chance"].eq(False).fillna(False).to_numpy(bool)
    for comparison in COMPARISONS:  # Holm over the tasks the claims are about: those above chance (or without a chance level)
        p = frame[f"{comparison}_p"].to_numpy(float).copy()
        p[~included] = math.nan
        frame[f"{comparison}_p_holm"] = holm(p) if len(p) else p
    for column in ("own_changed", "vs_random_changed", "vs_other_changed"):
        frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
    return frame


def _power(metric: str, baseline: np.ndarray, rand: list[dict[str, Any]], own: list[dict[str, Any]], effect: Optional[Effect],
           alpha: float, power: float) -> tuple[float, float]:
    """(random flip rate, minimum detectable own-vs-random drop) of a 0/1 metric; NaN otherwise."""
    right = baseline == 1
    if metric not in BINARY_METRICS or not right.any() or len(baseline) < 2:
        return math.nan, math.nan
    flips = [float(np.mean(np.asarray(r["per_example"])[right] == 0)) for r in rand]
    rate = float(np.mean(flips)) if flips else 0.0
    seed_sd = 0.0
    if len(rand) > 1 and own:
        d = np.asarray([r["per_example"] for r in rand], dtype=np.float64) - np.asarray(own[0]["per_example"], dtype=np.float64)
        seed_sd = float(math.sqrt(crossed_intervals(d, alpha=alpha)["seed_var"]))
    mde = minimum_detectable_drop(len(baseline), accuracy=float(baseline.mean()), random_flip_rate=min(rate, 0.999),
                                  n_seeds=max(len(rand), 1), seed_sd=seed_sd, alpha=alpha, power=power)
    return rate, mde


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
    ax.set_ylabel("ablated neurons")
    if matrix.seeds and matrix.set_names:
        ax.axhline(len(matrix.set_names) - 0.5, color="black", linewidth=1)
    if annotate and values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
    label = {"delta": "metric change", "loss_delta": "loss change"}.get(value, value)
    ax.figure.colorbar(image, ax=ax, label=f"{label} (ablated − baseline), mode={matrix.mode}")
    return ax
