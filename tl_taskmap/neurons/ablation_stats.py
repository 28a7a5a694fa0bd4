"""The tests behind an ablation matrix's claims: above chance, own vs random / other sets, power.

:func:`~tl_taskmap.neurons.ablation_effects.specificity` is :func:`specificity_table` here. The
matrix is read through its data (``tasks, metrics, set_names, baselines, records``) only, so any
unit kind (MLP neurons, attention heads) whose records carry ``ablated_set, kind, evaluated_task,
per_example, losses`` passes through. Intervals and tests come from :mod:`tl_taskmap.stats.inference`.

Example:
    >>> from tl_taskmap.neurons.ablation_stats import above_chance_tests, specificity_effects
    >>> above_chance_tests(matrix)                         # doctest: +SKIP
    >>> specificity_effects(matrix)["sst2"]["vs_random"]   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from tl_taskmap.stats.inference import Effect, above_chance_table, crossed_effect, crossed_intervals, holm, minimum_detectable_drop

#: Metrics whose per-example values are 0/1 (the minimum detectable drop is computed for these).
BINARY_METRICS = ("accuracy", "exact_match")


def per_example_array(records: Sequence[Mapping[str, Any]], key: str) -> Optional[np.ndarray]:
    """``[rows, examples]`` float64 array of ``key`` (``per_example`` or ``losses``); None if any record lacks it."""
    if any(not r.get(key) for r in records):
        return None
    return np.asarray([r[key] for r in records], dtype=np.float64)


def paired_effect(ablated: Optional[np.ndarray], reference: Optional[np.ndarray], *, random_rows: bool, bounded: bool,
            alpha: float) -> Optional[Effect]:
    """Effect of ``ablated − reference`` per example (``reference`` broadcasts over rows); None without data."""
    if ablated is None or reference is None or ablated.shape[-1] < 2:
        return None
    return crossed_effect(ablated - reference, alpha=alpha, random_rows=random_rows, bounded=bounded)


def interval_bounds(effect: Optional[Effect]) -> tuple[float, float]:
    return (effect.low, effect.high) if effect is not None else (math.nan, math.nan)


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


def above_chance_tests(matrix: Any, *, alpha: float = 0.05) -> pd.DataFrame:
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


def specificity_effects(matrix: Any, *, alpha: float = 0.05) -> dict[str, dict[str, Optional[Effect]]]:
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
            effects[f"vs_{label}"] = paired_effect(per_example_array(rows, "per_example"), per_example_array(own, "per_example"),
                                             random_rows=random_rows, bounded=True, alpha=alpha) if rows else None
            own_l, rows_l = per_example_array(own, "losses"), per_example_array(rows, "losses")
            effects[f"loss_vs_{label}"] = (crossed_effect(own_l - rows_l, alpha=alpha, random_rows=random_rows, bounded=False)
                                           if rows and own_l is not None and rows_l is not None and own_l.shape[-1] > 1 else None)
        out[task] = effects
    return out


def specificity_table(matrix: Any, *, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
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
            row[f"{comparison}_low"], row[f"{comparison}_high"] = interval_bounds(effect)
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
