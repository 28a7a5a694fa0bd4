"""Tests behind the report's claims: above chance, own vs random / other neurons, multiple tasks, power.

* **Above chance** — :func:`binomial_above_chance`: exact one-sided binomial test of ``k`` correct
  of ``n`` against the chance rate (``P(X ≥ k)``, ``X ~ Binomial(n, chance)``).
* **Several tasks** — :func:`holm`: Holm's step-down adjustment; "N of M tasks" counts tasks whose
  *adjusted* p-value is below α (family-wise error ≤ α).
* **Own vs random / other neurons** — :func:`crossed_effect`. The data are a seeds × examples table
  of per-example differences (e.g. ``random_s(x) − own(x)`` of the metric): every random set is scored
  on the same examples, so examples and seeds are *crossed* random factors. The interval is the
  two-way random-effects (ANOVA) one: with ``d̄`` the grand mean, ``MS_ex``, ``MS_seed``, ``MS_res`` the
  mean squares of examples, seeds and residual,

      Var(d̄) = σ²_ex/n + σ²_seed/S + σ²_res/(nS),  estimated by variance components clipped at 0
      (= (MS_ex + MS_seed − MS_res)/(nS) when both are positive),

  and a t-interval with Satterthwaite degrees of freedom. Why not a two-level bootstrap: with the
  design crossed, resampling examples and seeds independently counts the interaction twice, and
  resampling 5 seeds understates their variance by 4/5 and uses normal tails where ~4 degrees of
  freedom apply (the issue this module answers measured that failure). The t-interval is exact
  for Gaussian data and, for 0/1 accuracies at 80 examples × 5 seeds, covers 93–97% in the
  simulation of ``tests/stats/test_inference.py``. Rows that are not a random sample (the other
  tasks' sets) are averaged first (``random_rows=False``): a paired t-interval over examples.
* **No example differs** — when every difference is exactly 0 (e.g. no prediction flipped), the
  variance estimate is 0 and a ``[0, 0]`` interval would read as certainty. :class:`Effect` then has
  NaN bounds, ``n_differing == 0``, and (for bounded metrics) ``bound``: the Clopper–Pearson upper
  limit on the share of examples that could differ, which bounds the effect's size.
* **Power** — :func:`minimum_detectable_drop`: the smallest drop of accuracy (own vs random neurons)
  that the two-sided test at α detects with the given power, at ``n`` examples and ``S`` seeds.

Everything is float64 NumPy; :func:`crossed_intervals` is vectorised over leading axes (thousands
of simulated tables at once).

Example:
    >>> from tl_taskmap.stats.inference import binomial_above_chance, holm, crossed_effect
    >>> round(binomial_above_chance(9, 12, 0.5), 4)
    0.073
    >>> holm([0.01, 0.04, 0.03]).tolist()
    [0.03, 0.06, 0.06]
    >>> crossed_effect([[1, 0, 1, 0], [1, 1, 0, 0]]).n_differing
    3
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
from jaxtyping import Float

__all__ = ["Effect", "binomial_above_chance", "above_chance_table", "holm", "crossed_intervals", "crossed_effect", "combine_effects",
           "minimum_detectable_drop", "clopper_pearson_upper"]


def binomial_above_chance(n_correct: int, n: int, chance: float) -> float:
    """Exact one-sided binomial p-value that accuracy exceeds ``chance``: ``P(X ≥ n_correct)``, ``X ~ Bin(n, chance)``.

    Example:
        >>> binomial_above_chance(7, 12, 0.5)   # 7 of 12 on a 2-way task is not evidence
        0.38720703125
    """
    from scipy import stats

    if n <= 0:
        raise ValueError(f"n must be ≥ 1 examples, got {n}")
    if not 0 <= n_correct <= n or int(n_correct) != n_correct:
        raise ValueError(f"n_correct must be an integer in [0, n={n}], got {n_correct}")
    if not 0 < chance < 1:
        raise ValueError(f"chance must lie strictly between 0 and 1, got {chance}")
    return float(stats.binom.sf(int(n_correct) - 1, int(n), float(chance)))


def above_chance_table(frame: Any, *, alpha: float = 0.05, by: Optional[str] = None) -> Any:
    """Add the exact above-chance test to a table of scores (one row per task, e.g. ``baseline.csv``).

    ``frame`` needs ``metric_value`` (accuracy), ``n`` and ``chance`` (NaN/None: no chance level, e.g.
    generation) and optionally ``metric``. Adds ``n_correct``, ``p_above_chance`` (one-sided exact
    binomial), ``p_above_chance_holm`` (Holm over the rows with a test; per group of ``by``, e.g.
    ``"model"``) and ``above_chance`` (adjusted p < ``alpha``; ``<NA>`` where there is no test).

    Example:
        >>> import pandas as pd
        >>> above_chance_table(pd.DataFrame({"metric_value": [0.75, 0.55], "n": [40, 40], "chance": [0.5, 0.5]}))["above_chance"].tolist()
        [True, False]
    """
    import pandas as pd

    out = frame.copy()
    chance = pd.to_numeric(out["chance"], errors="coerce").to_numpy(float)
    n = out["n"].to_numpy(int)
    k = np.rint(out["metric_value"].to_numpy(float) * n).astype(int)
    testable = np.isfinite(chance) & (n > 0) & (chance > 0) & (chance < 1)
    if "metric" in out:
        testable &= (out["metric"] == "accuracy").to_numpy(bool)
    out["n_correct"] = k
    out["p_above_chance"] = [binomial_above_chance(int(ki), int(ni), float(ci)) if t else math.nan
                             for ki, ni, ci, t in zip(k, n, chance, testable)]
    adjusted = np.full(len(out), np.nan)
    groups = [np.arange(len(out))] if by is None else [np.flatnonzero((out[by] == g).to_numpy(bool)) for g in dict.fromkeys(out[by])]
    for rows in groups:
        adjusted[rows] = holm(out["p_above_chance"].to_numpy(float)[rows])
    out["p_above_chance_holm"] = adjusted
    out["above_chance"] = pd.array([pd.NA if math.isnan(p) else bool(p < alpha) for p in adjusted], dtype="boolean")
    return out


def holm(p_values: Sequence[float], alpha: float = 0.05) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN and does not count towards the family size).

    A hypothesis is rejected at family-wise level ``alpha`` when its adjusted p-value is below ``alpha``.

    Example:
        >>> holm([0.01, 0.04, 0.03, float("nan")]).round(3).tolist()
        [0.03, 0.06, 0.06, nan]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def clopper_pearson_upper(k: int, n: int, alpha: float = 0.05) -> float:
    """Two-sided ``1 − alpha`` Clopper–Pearson upper limit of a proportion (``1 − (alpha/2)^(1/n)`` when ``k = 0``).

    Example:
        >>> round(clopper_pearson_upper(0, 80), 4)
        0.0451
    """
    from scipy import stats

    if k >= n:
        return 1.0
    return float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))


def crossed_intervals(differences: Float[np.ndarray, "*batch seeds examples"], alpha: float = 0.05,
                      random_rows: bool = True) -> dict[str, np.ndarray]:
    """Vectorised core of :func:`crossed_effect` over leading axes.

    Returns arrays ``estimate, se, df, low, high, p_value, n_differing, seed_var`` of the leading shape
    (``seed_var``: the between-rows variance component, clipped at 0; 0 for one row or fixed rows).
    Where no value differs from 0, ``low``/``high``/``se`` are NaN and ``p_value`` is 1.

    Example:
        >>> d = np.random.default_rng(0).normal(0.1, 1, size=(1000, 5, 80))
        >>> out = crossed_intervals(d)
        >>> float(((out["low"] <= 0.1) & (0.1 <= out["high"])).mean())   # doctest: +SKIP
        0.951
    """
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    if d.ndim < 2:
        raise ValueError(f"differences must be [..., rows, examples], got shape {d.shape}")
    rows, n = d.shape[-2], d.shape[-1]
    if rows < 1 or n < 2:
        raise ValueError(f"need ≥ 1 row and ≥ 2 examples for an interval, got {rows} rows × {n} examples")
    if not np.all(np.isfinite(d)):
        raise ValueError("differences contain NaN or inf: check the per-example scores")
    estimate = d.mean(axis=(-2, -1))
    example_means = d.mean(axis=-2)
    n_differing = np.count_nonzero(np.any(d != 0, axis=-2), axis=-1)
    if rows == 1 or not random_rows:
        # Rows fixed (or a single one): a paired t-interval over the examples' row means.
        var = example_means.var(axis=-1, ddof=1) / n
        df = np.full(estimate.shape, float(n - 1))
        seed_var = np.zeros(estimate.shape)
    else:
        seed_means = d.mean(axis=-1)
        ms_ex = rows * ((example_means - estimate[..., None]) ** 2).sum(-1) / (n - 1)
        ms_seed = n * ((seed_means - estimate[..., None]) ** 2).sum(-1) / (rows - 1)
        resid = d - seed_means[..., None] - example_means[..., None, :] + estimate[..., None, None]
        ms_res = (resid ** 2).sum((-2, -1)) / ((n - 1) * (rows - 1))
        # Variance components clipped at 0; var is then a linear combination c·MS of the mean squares.
        ex_pos, seed_pos = ms_ex > ms_res, ms_seed > ms_res
        scale = 1.0 / (n * rows)
        c_ex, c_seed = ex_pos * scale, seed_pos * scale
        c_res = (1.0 - ex_pos.astype(float) - seed_pos.astype(float)) * scale
        var = c_ex * ms_ex + c_seed * ms_seed + c_res * ms_res
        denom = ((c_ex * ms_ex) ** 2 / (n - 1) + (c_seed * ms_seed) ** 2 / (rows - 1)
                 + (c_res * ms_res) ** 2 / ((n - 1) * (rows - 1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            df = np.where(denom > 0, var ** 2 / np.where(denom > 0, denom, 1.0), float(n - 1))
        df = np.clip(df, 1.0, None)
        seed_var = np.clip((ms_seed - ms_res) / n, 0.0, None)
    var = np.clip(var, 0.0, None)
    se = np.sqrt(var)
    half = stats.t.ppf(1 - alpha / 2, df) * se
    with np.errstate(divide="ignore", invalid="ignore"):
        t_stat = np.where(se > 0, estimate / np.where(se > 0, se, 1.0), np.where(estimate != 0, np.inf, 0.0))
    p_value = np.where(np.isinf(t_stat), 0.0, 2 * stats.t.sf(np.abs(t_stat), df))
    none_differ = n_differing == 0
    p_value = np.where(none_differ, 1.0, p_value)
    nan = np.full(estimate.shape, np.nan)
    return {"estimate": estimate, "se": np.where(none_differ, nan, se), "df": df,
            "low": np.where(none_differ, nan, estimate - half), "high": np.where(none_differ, nan, estimate + half),
            "p_value": p_value, "n_differing": n_differing, "seed_var": seed_var}


@dataclass(frozen=True)
class Effect:
    """An effect (mean of per-example differences) with its interval, test and sample sizes.

    Attributes:
        estimate: Mean difference. low, high: ``1 − alpha`` interval (NaN when no example differs).
        p_value: Two-sided p-value of "no difference" (1 when no example differs). se, df: standard
            error and degrees of freedom of the t-interval. n_examples, n_rows: examples and rows
            (random seeds, or other tasks' sets) behind it. n_differing: examples with any nonzero
            difference. bound: when none differs and the values are bounded by 1 in size, the
            Clopper–Pearson upper limit on the share of examples that differ (so ``|effect| < bound``).
        method: The test, in words.

    Example:
        >>> crossed_effect([[0, 0, 0]]).describe()
        'no example differs (0 of 3); |effect| < 0.708 (95% Clopper–Pearson)'
    """

    estimate: float
    low: float
    high: float
    p_value: float
    se: float
    df: float
    n_examples: int
    n_rows: int
    n_differing: int
    bound: float = math.nan
    alpha: float = 0.05
    method: str = ""

    @property
    def no_difference(self) -> bool:
        """True when every per-example difference is exactly zero (e.g. no prediction flipped)."""
        return self.n_differing == 0

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (equivalently ``p_value < alpha``)."""
        return bool(self.p_value < self.alpha and not self.no_difference)

    def describe(self, digits: int = 3) -> str:
        """``+0.125 [0.050, 0.200]`` or the no-difference statement."""
        level = f"{1 - self.alpha:.0%}"
        if self.no_difference:
            limit = f"; |effect| < {self.bound:.{digits}f} ({level} Clopper–Pearson)" if math.isfinite(self.bound) else ""
            return f"no example differs (0 of {self.n_examples}){limit}"
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        return (f"Effect({self.describe()}, p={self.p_value:.3g}, n={self.n_examples}, rows={self.n_rows}"
                + (f", {self.method}" if self.method else "") + ")")


def crossed_effect(differences: Float[np.ndarray, "rows examples"] | Sequence[Sequence[float]], *, alpha: float = 0.05,
                   random_rows: bool = True, bounded: bool = True) -> Effect:
    """Mean of a rows × examples table of paired differences with an interval over examples and rows.

    ``random_rows=True``: rows are random draws (matched random neuron sets, one per seed), crossed
    with examples; the interval is the two-way random-effects t-interval (Satterthwaite df), see the
    module docstring. ``random_rows=False``: rows are fixed (e.g. the other tasks' sets): they are
    averaged per example and the interval is a paired t-interval over examples. ``bounded``: the
    per-example differences lie in [−1, 1] (accuracy, exact match), which lets a table of zeros carry
    a bound on the effect.

    Example:
        >>> d = [[1, 0, 0, 1, 0, 1], [1, 1, 0, 1, 0, 0]]   # random_s(x) − own(x), 2 seeds × 6 examples
        >>> crossed_effect(d)
        Effect(+0.500 [+0.031, +0.969], p=0.0409, n=6, rows=2, crossed examples × 2 random rows, Satterthwaite t)
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2:
        raise ValueError(f"differences must be [rows, examples], got shape {d.shape}")
    out = crossed_intervals(d, alpha=alpha, random_rows=random_rows)
    rows, n = d.shape
    none = int(out["n_differing"]) == 0
    bound = clopper_pearson_upper(0, n, alpha) if none and bounded else math.nan
    if rows > 1 and random_rows:
        method = f"crossed examples × {rows} random rows, Satterthwaite t"
    elif rows > 1:
        method = f"paired t over examples (mean of {rows} fixed rows)"
    else:
        method = "paired t over examples"
    return Effect(float(out["estimate"]), float(out["low"]), float(out["high"]), float(out["p_value"]), float(out["se"]),
                  float(out["df"]), n, rows, int(out["n_differing"]), bound, alpha, method)


def combine_effects(effects: Sequence[Effect], *, alpha: float = 0.05) -> Optional[Effect]:
    """Mean of independent effects (e.g. over tasks), with a Welch–Satterthwaite t-interval.

    Effects without an interval (no example differs) enter with estimate 0 and no variance. Returns
    None for an empty list. The tasks are treated as independent (different examples); random sets
    shared between tasks make this interval somewhat too narrow.

    Example:
        >>> combine_effects([crossed_effect([[1, 0, 1, 1]]), crossed_effect([[0, 1, 0, 0, 1]])]).n_rows
        2
    """
    from scipy import stats

    if not effects:
        return None
    k = len(effects)
    estimate = float(np.mean([e.estimate for e in effects]))
    parts = np.array([(e.se / k) ** 2 if math.isfinite(e.se) else 0.0 for e in effects])
    dfs = np.array([e.df for e in effects])
    var = float(parts.sum())
    n_differing = sum(e.n_differing for e in effects)
    if n_differing == 0:
        return Effect(estimate, math.nan, math.nan, 1.0, math.nan, math.nan, sum(e.n_examples for e in effects), k, 0,
                      max(e.bound for e in effects), alpha, f"mean over {k} tasks")
    df = var ** 2 / float((parts ** 2 / dfs).sum()) if var > 0 else float(dfs.min())
    se = math.sqrt(var)
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    p = float(2 * stats.t.sf(abs(estimate) / se, df)) if se > 0 else (0.0 if estimate else 1.0)
    return Effect(estimate, estimate - half, estimate + half, p, se, df, sum(e.n_examples for e in effects), k, n_differing,
                  math.nan, alpha, f"mean over {k} tasks, Welch–Satterthwaite t")


def minimum_detectable_drop(n: int, *, accuracy: float = 1.0, random_flip_rate: float = 0.0, n_seeds: int = 1,
                            seed_sd: float = 0.0, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest accuracy drop (own − random neurons) detected with ``power`` by the two-sided test at ``alpha``.

    Model (the run's design): of ``n`` examples a share ``accuracy`` is answered correctly; ablating
    each random set turns each correct answer wrong with probability ``q = random_flip_rate``
    independently; the own set does so with probability ``p``; nothing turns right. The effect is
    ``δ = accuracy·(p − q)``. The per-example difference ``d = F_own − mean_s F_s`` has
    ``Var(d) = accuracy·[p(1−p) + q(1−q)/S + (p−q)²] − δ²``, and ``seed_sd`` (the standard deviation
    of the per-seed random drop beyond that) adds ``seed_sd²/S``. The test detects ``δ`` with power
    ``π`` when ``δ ≥ (z_{1−α/2} + z_π)·SE(δ)``; the smallest such ``δ`` is found by bisection. NaN
    when no drop up to ``accuracy·(1 − q)`` is detectable.

    Example:
        >>> round(minimum_detectable_drop(80), 3)   # every answer right, random sets flip nothing
        0.089
        >>> round(minimum_detectable_drop(12, accuracy=0.8, random_flip_rate=0.1, n_seeds=5), 3)
        0.401
    """
    from scipy import optimize, stats

    if n < 2:
        raise ValueError(f"n must be ≥ 2 examples, got {n}")
    if not 0 < accuracy <= 1 or not 0 <= random_flip_rate < 1 or n_seeds < 1 or seed_sd < 0:
        raise ValueError(f"need 0 < accuracy ≤ 1, 0 ≤ random_flip_rate < 1, n_seeds ≥ 1, seed_sd ≥ 0; got {accuracy}, "
                         f"{random_flip_rate}, {n_seeds}, {seed_sd}")
    k = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    q, a, s = float(random_flip_rate), float(accuracy), int(n_seeds)

    def gap(delta: float) -> float:
        p = q + delta / a
        var = a * (p * (1 - p) + q * (1 - q) / s + (p - q) ** 2) - delta ** 2
        return delta - k * math.sqrt(max(var, 0.0) / n + seed_sd ** 2 / s)

    top = a * (1 - q)
    if gap(top) < 0:
        return math.nan
    if gap(1e-12) >= 0:
        return 0.0
    return float(optimize.brentq(gap, 1e-12, top, xtol=1e-10))
