"""Layer maps that survive a null: paired CKA differences with bootstrap intervals over examples.

Two comparisons, one primitive (:func:`cka_difference_by_layer`):

* **Task control vs null control** (one model): where does the control fine-tuned on task *t*
  depart from the model *more* than a *null control* — the same fine-tuning on the task's prompts
  with shuffled answers — does? ``extra_departure = CKA(model, null) − CKA(model, control)``;
  a layer is *task-specific* when its simultaneous interval lies above ``margin``
  (:func:`task_vs_null`). Layers where the interval covers zero are layers that *any* fine-tune of
  this length moves (or leaves unchanged) alike — not evidence of task learning.
* **The paper's pair** (Zhao et al. 2024): ``gain = CKA(multi-task, C_t) − CKA(base, C_t)`` per
  task and layer (:func:`paper_pair`), the same for the null controls, and the section rule of
  :func:`~tl_taskmap.stats.sections.detect_sections` on the task-mean curves.

Estimator: the paper's biased linear CKA, from the n×n linear Gram matrices (cheap when n ≪ d); a
bootstrap replicate resamples examples with replacement, *the same rows for every model and every
layer*, so both terms of a difference see the same examples. Intervals are percentile intervals at
level ``1 − (1 − level) / n_layers`` (Bonferroni over layers), so "no layer is task-specific" holds
jointly at ``level``. The small-n upward bias of biased CKA is shared by both terms of a difference
(same n, same reference representation), which is why the differences, not the raw values, carry
the claims.

Example:
    >>> rng = np.random.default_rng(0)
    >>> model = {0: rng.normal(size=(40, 6))}
    >>> control = {0: model[0] @ rng.normal(size=(6, 6))}      # the control moved this layer
    >>> null = {0: model[0] + 0.01 * rng.normal(size=(40, 6))}  # the null control did not
    >>> result = task_vs_null(model, control, null, n_boot=200)
    >>> result.task_specific_layers()
    [0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from jaxtyping import Float

__all__ = ["LayerDifference", "cka_difference_by_layer", "cka_contrast_by_layer", "paper_pair_vs_null", "task_vs_null", "paper_pair", "linear_cka_from_grams",
           "bootstrap_indices"]

Acts = Union[Mapping[int, Float[np.ndarray, "n d"]], Sequence[Float[np.ndarray, "n d"]]]


def _as_layers(acts: Acts, name: str) -> dict[int, np.ndarray]:
    items = acts.items() if isinstance(acts, Mapping) else enumerate(acts)
    out = {}
    for layer, x in items:
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().double().numpy()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{name}[{layer}] must be [n_examples, d], got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}[{layer}] holds NaN/inf: drop those examples from every model before comparing")
        out[int(layer)] = arr
    if not out:
        raise ValueError(f"{name} has no layers")
    return out


def _gram(x: np.ndarray) -> np.ndarray:
    return x @ x.T


def linear_cka_from_grams(k: Float[np.ndarray, "*b n n"], l: Float[np.ndarray, "*b n n"]) -> Float[np.ndarray, "*b"]:
    """Biased linear CKA from uncentred linear Gram matrices (batched over leading axes), float64.

    Equals Kornblith's ``feature_space_linear_cka(x, y)`` when ``k = x xᵀ`` and ``l = y yᵀ``.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(10, 3))
        >>> round(float(linear_cka_from_grams(x @ x.T, 2 * x @ x.T)), 8)
        1.0
    """
    def centre(g: np.ndarray) -> np.ndarray:
        return g - g.mean(-1, keepdims=True) - g.mean(-2, keepdims=True) + g.mean((-1, -2), keepdims=True)

    kc, lc = centre(np.asarray(k, np.float64)), centre(np.asarray(l, np.float64))
    hsic_kl = (kc * lc).sum((-1, -2))
    denom = np.sqrt((kc * kc).sum((-1, -2)) * (lc * lc).sum((-1, -2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, hsic_kl / np.where(denom > 0, denom, 1.0), np.nan)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` example indices drawn with replacement (seeded; the same for every layer and model)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _cka_replicates(k: np.ndarray, l: np.ndarray, idx: np.ndarray, chunk: int = 128) -> np.ndarray:
    out = np.empty(idx.shape[0])
    for start in range(0, idx.shape[0], chunk):
        sel = idx[start:start + chunk]
        rows, cols = sel[:, :, None], sel[:, None, :]
        out[start:start + chunk] = linear_cka_from_grams(k[rows, cols], l[rows, cols])
    return out


@dataclass(frozen=True)
class LayerDifference:
    """Per-layer (and per-task) differences of two CKA curves, with simultaneous bootstrap intervals.

    Attributes:
        frame: One row per task and layer: ``task, layer, cka_a, cka_b, diff (= cka_a − cka_b), low,
            high, n, positive`` (``positive``: the interval lies above ``margin``).
        rule: The decision rule in words, with its level, correction and margin.
        what: What ``cka_a`` and ``cka_b`` are (e.g. ``"CKA(model, null)"``).
    """

    frame: pd.DataFrame
    rule: str
    what: tuple[str, str] = ("a", "b")

    def task_specific_layers(self, task: Optional[str] = None) -> list[int]:
        """Layers whose interval lies above the margin (for one task, or for any task when ``task`` is None)."""
        rows = self.frame if task is None else self.frame[self.frame["task"] == task]
        return sorted({int(x) for x in rows.loc[rows["positive"], "layer"]})

    def curve(self, column: str = "diff", task: Optional[str] = None) -> np.ndarray:
        """``column`` per layer, averaged over tasks unless ``task`` is given."""
        rows = self.frame if task is None else self.frame[self.frame["task"] == task]
        return rows.groupby("layer")[column].mean().to_numpy()

    def __repr__(self) -> str:
        tasks = self.frame["task"].nunique()
        return (f"LayerDifference({self.what[0]} − {self.what[1]}: {tasks} task(s), {self.frame['layer'].nunique()} layers, "
                f"positive at layers {self.task_specific_layers()})")


def cka_difference_by_layer(
    a: tuple[Acts, Acts], b: tuple[Acts, Acts], *, task: str = "task", n_boot: int = 1000, level: float = 0.95,
    margin: float = 0.0, seed: int = 0, what: tuple[str, str] = ("a", "b"),
) -> LayerDifference:
    """``CKA(a[0], a[1]) − CKA(b[0], b[1])`` per layer, with a paired bootstrap over examples.

    All four representations must hold the *same examples in the same order* (rows), per layer.
    Intervals are percentile intervals at ``1 − (1 − level) / n_layers`` (Bonferroni over layers).

    Args:
        a, b: ``(X, Y)`` pairs of per-layer activations (``{layer: [n, d]}`` or a list per layer).
        task: Label written in the ``task`` column.
        n_boot: Bootstrap replicates (≥ 100). level: Joint coverage over layers. margin: A layer is
            ``positive`` when its lower bound exceeds this.
        seed: Seeds the resampling (one draw of example indices, shared by all layers and models).

    Example:
        >>> rng = np.random.default_rng(1)
        >>> x = [rng.normal(size=(30, 4))]
        >>> d = cka_difference_by_layer((x, x), (x, [rng.normal(size=(30, 4))]), n_boot=200)
        >>> bool(d.frame["positive"].iloc[0])
        True
    """
    return cka_contrast_by_layer([(1.0, *a), (-1.0, *b)], columns=("cka_a", "cka_b"), task=task, n_boot=n_boot,
                                 level=level, margin=margin, seed=seed, what=what)


def cka_contrast_by_layer(
    terms: Sequence[tuple[float, Acts, Acts]], *, columns: Sequence[str], task: str = "task", n_boot: int = 1000,
    level: float = 0.95, margin: float = 0.0, seed: int = 0, what: tuple[str, str] = ("a", "b"),
) -> LayerDifference:
    """``Σ sign_i · CKA(X_i, Y_i)`` per layer with a paired bootstrap (see :func:`cka_difference_by_layer`).

    ``columns`` names each term's CKA column. A difference of differences (the paper's gain minus the
    null's gain) is four terms.

    Example:
        >>> x = [np.random.default_rng(0).normal(size=(12, 3))]
        >>> cka_contrast_by_layer([(1.0, x, x), (-1.0, x, x)], columns=("p", "q"), n_boot=100).frame["diff"].item()
        0.0
    """
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer ≥ 100 (percentile intervals need replicates), got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if len(columns) != len(terms):
        raise ValueError(f"{len(terms)} terms but {len(columns)} column names")
    names = [f"{col}[{side}]" for col in columns for side in (0, 1)]
    layers_sets = [_as_layers(x, n) for (_, *pair), col in zip(terms, columns) for x, n in zip(pair, (f"{col}[0]", f"{col}[1]"))]
    layers = sorted(layers_sets[0])
    for acts, name in zip(layers_sets[1:], names[1:]):
        if sorted(acts) != layers:
            raise ValueError(f"{name} has layers {sorted(acts)} but {names[0]} has {layers}: capture the same layers")
    n = layers_sets[0][layers[0]].shape[0]
    for acts, name in zip(layers_sets, names):
        for layer, x in acts.items():
            if x.shape[0] != n:
                raise ValueError(f"{name}[{layer}] has {x.shape[0]} examples, {names[0]} has {n}: rows must be the same examples")
    if n < 4:
        raise ValueError(f"need at least 4 examples for a bootstrap interval, got {n}")
    idx = bootstrap_indices(n, n_boot, seed)
    alpha = (1 - level) / len(layers)
    signs = [float(t[0]) for t in terms]
    rows = []
    for layer in layers:
        grams: dict[int, np.ndarray] = {}  # one Gram per distinct array (a model shared by two terms is computed once)
        values, reps = {}, np.zeros(n_boot)
        for i, (sign, col) in enumerate(zip(signs, columns)):
            x, y = layers_sets[2 * i][layer], layers_sets[2 * i + 1][layer]
            k = grams.setdefault(id(x), _gram(x))
            l = grams.setdefault(id(y), _gram(y))
            values[col] = float(linear_cka_from_grams(k, l))
            reps += sign * _cka_replicates(k, l, idx)
        diff = sum(sign * values[col] for sign, col in zip(signs, columns))
        reps = reps[np.isfinite(reps)]
        low, high = (np.quantile(reps, [alpha / 2, 1 - alpha / 2]) if reps.size else (np.nan, np.nan))
        rows.append({"task": task, "layer": layer, **values, "diff": diff, "low": float(low), "high": float(high),
                     "n": n, "positive": bool(low > margin)})
    rule = (f"{what[0]} − {what[1]} (biased linear CKA, n={n} examples); a layer is positive when the lower end of its "
            f"{level:.0%} bootstrap interval (percentile, {n_boot} resamples of examples shared by all layers and models; "
            f"Bonferroni over {len(layers)} layers: per-layer level {1 - alpha:.4f}) is above {margin:g}.")
    return LayerDifference(pd.DataFrame(rows), rule, what)


def _concat(parts: Sequence[LayerDifference], what: tuple[str, str]) -> LayerDifference:
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    rule = parts[0].rule if len({p.frame["n"].iloc[0] for p in parts}) == 1 else parts[0].rule.replace(
        f"n={parts[0].frame['n'].iloc[0]} examples", "n per task in the table")
    return LayerDifference(frame, rule, what)


def task_vs_null(model: Acts, control: Acts, null: Acts, *, task: str = "task", n_boot: int = 1000, level: float = 0.95,
                 margin: float = 0.0, seed: int = 0) -> LayerDifference:
    """Where a task control departs from the model more than a null control (shuffled answers) does.

    ``diff = CKA(model, null) − CKA(model, control)`` = extra departure of the task control. Positive
    layers are *task-specific*: fine-tuning on the real answers changed them beyond what fine-tuning on
    the same prompts with shuffled answers did. See :func:`cka_difference_by_layer` for the interval.

    Example:
        >>> x = {0: np.random.default_rng(0).normal(size=(20, 3))}
        >>> task_vs_null(x, x, x, n_boot=100).task_specific_layers()
        []
    """
    return cka_difference_by_layer((model, null), (model, control), task=task, n_boot=n_boot, level=level, margin=margin,
                                   seed=seed, what=("CKA(model, null control)", "CKA(model, task control)"))


def paper_pair(tuned: Mapping[str, Acts], base: Mapping[str, Acts], controls: Mapping[str, Acts], *, n_boot: int = 1000,
               level: float = 0.95, margin: float = 0.0, seed: int = 0, tuned_label: str = "multi-task",
               base_label: str = "base") -> LayerDifference:
    """The paper's comparison per task: ``CKA(tuned, C_t) − CKA(base, C_t)`` with bootstrap intervals.

    ``tuned[t]``, ``base[t]`` and ``controls[t]`` are the three models' activations on task ``t``'s
    (evaluation) examples. Pass null controls as ``controls`` for the null pair.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> acts = {"t": {0: rng.normal(size=(20, 3))}}
        >>> paper_pair(acts, acts, acts, n_boot=100).frame["diff"].tolist()
        [0.0]
    """
    missing = sorted(set(controls) - set(tuned) | set(controls) - set(base))
    if missing:
        raise ValueError(f"tasks {missing} have a control but no activations of the tuned or base model")
    if not controls:
        raise ValueError("paper_pair needs at least one task with a control model")
    what = (f"CKA({tuned_label}, control)", f"CKA({base_label}, control)")
    parts = [cka_difference_by_layer((tuned[t], controls[t]), (base[t], controls[t]), task=t, n_boot=n_boot, level=level,
                                     margin=margin, seed=seed, what=what) for t in controls]
    return _concat(parts, what)


def paper_pair_vs_null(tuned: Mapping[str, Acts], base: Mapping[str, Acts], controls: Mapping[str, Acts],
                       nulls: Mapping[str, Acts], *, n_boot: int = 1000, level: float = 0.95, margin: float = 0.0,
                       seed: int = 0) -> LayerDifference:
    """Which of the paper's gains survive the null: ``[CKA(T,C_t) − CKA(B,C_t)] − [CKA(T,N_t) − CKA(B,N_t)]``.

    Positive layers are where the tuned model moved toward the task control by more than it moved
    toward the null control (trained on the same prompts with shuffled answers).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> acts = {"t": {0: rng.normal(size=(20, 3))}}
        >>> paper_pair_vs_null(acts, acts, acts, acts, n_boot=100).task_specific_layers()
        []
    """
    tasks = [t for t in controls if t in nulls]
    if not tasks:
        raise ValueError("paper_pair_vs_null needs tasks that have both a control and a null control")
    what = ("gain over base with the task control", "gain over base with the null control")
    parts = [cka_contrast_by_layer([(1.0, tuned[t], controls[t]), (-1.0, base[t], controls[t]), (-1.0, tuned[t], nulls[t]),
                                    (1.0, base[t], nulls[t])], columns=("cka_tuned_control", "cka_base_control",
                                                                        "cka_tuned_null", "cka_base_null"),
                                   task=t, n_boot=n_boot, level=level, margin=margin, seed=seed, what=what) for t in tasks]
    return _concat(parts, what)
