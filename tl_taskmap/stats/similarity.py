"""Cross-task similarity of representations, and 2-D embeddings of per-example representations.

Everything here is a pure NumPy function on arrays, so it is testable on its own; the result
object (:class:`tl_taskmap.stats.results.LayerStats`) calls these with what the runner stored:

* :func:`cosine_similarity_matrix` — task × task cosine of *mean* task representations (one
  vector per task and layer, accumulated by the runner from every example). Raw means of
  residual-stream states share a large common component, so raw cosines tend to sit near 1;
  ``centre=True`` subtracts the mean of the task means first, so the cosines show how tasks
  differ from each other.
* :func:`cross_task_linear_cka` — task × task linear CKA of per-example representations. Only
  meaningful when the tasks' inputs are *shared*: row ``i`` of every task is the same underlying
  example (e.g. one dataset under several instruction templates). It is NaN where the tasks have
  different numbers of examples.
* :func:`pca_2d` and :func:`tsne_2d` (a small exact t-SNE, van der Maaten & Hinton 2008, O(n²)
  memory; fine for a few thousand points) — the coordinates behind the t-SNE plots.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from jaxtyping import Float

from .cka import feature_space_linear_cka

__all__ = ["cosine_similarity_matrix", "cross_task_linear_cka", "pca_2d", "tsne_2d", "embed_2d",
           "centred_cosine_omitted", "embedding_omitted", "MIN_TASKS_FOR_CENTRED_COSINE", "MIN_POINTS_PER_TASK_FOR_TSNE"]

EmbeddingMethod = Literal["tsne", "pca"]

#: Centring on the mean of k task means leaves k − 1 degrees of freedom: with 2 tasks the two centred
#: means are ``+v`` and ``−v``, so their cosine is −1 at every layer by construction.
MIN_TASKS_FOR_CENTRED_COSINE = 3
#: Fewer points per task than this and a t-SNE picture shows the perplexity, not the representation.
MIN_POINTS_PER_TASK_FOR_TSNE = 30


def centred_cosine_omitted(n_tasks: int) -> str | None:
    """Why a cosine of *centred* task means is not shown for ``n_tasks`` tasks (None when it can be).

    >>> centred_cosine_omitted(2).split(":")[0]
    'Cosine of centred task means'
    >>> centred_cosine_omitted(3) is None
    True
    """
    if n_tasks >= MIN_TASKS_FOR_CENTRED_COSINE:
        return None
    return (f"Cosine of centred task means: needs ≥ {MIN_TASKS_FOR_CENTRED_COSINE} tasks, this run has {n_tasks}. "
            "Centred on their own mean, two task means are v and −v, so their cosine is −1 at every layer by "
            "construction, not a finding.")


def embedding_omitted(points_per_task: dict[str, int], minimum: int = MIN_POINTS_PER_TASK_FOR_TSNE) -> str | None:
    """Why a t-SNE of per-example points is not shown (None when every task has ``minimum`` points).

    >>> "b (40)" in embedding_omitted({"a": 12, "b": 40})
    False
    """
    few = {t: n for t, n in points_per_task.items() if n < minimum}
    if not few:
        return None
    listed = ", ".join(f"{t} ({n})" for t, n in few.items())
    return (f"t-SNE: needs ≥ {minimum} points per task to show structure rather than the perplexity setting; "
            f"too few for {listed} (raise --examples).")


def cosine_similarity_matrix(
    vectors: Float[np.ndarray, "task d"], centre: bool = False
) -> Float[np.ndarray, "task task"]:
    """Cosine similarity between every pair of rows (e.g. mean task representations), in float64.

    ``centre=True`` subtracts the mean row first. A zero row has no direction: its entries are NaN.

    Example:
        >>> cosine_similarity_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])).round(3).tolist()
        [[1.0, 0.707, 0.0], [0.707, 1.0, 0.707], [0.0, 0.707, 1.0]]
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D [task, d], got shape {v.shape}.")
    if centre:
        v = v - v.mean(0, keepdims=True)
    norms = np.linalg.norm(v, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = v / np.where(norms > 0, norms, np.nan)[:, None]
    out = unit @ unit.T
    return np.clip(out, -1.0, 1.0)


def cross_task_linear_cka(
    samples: Sequence[Float[np.ndarray, "n d"]], debiased: bool = False
) -> Float[np.ndarray, "task task"]:
    """Linear CKA between tasks whose inputs are shared row by row (NaN where the n differ).

    Row ``i`` of every array must be the same underlying example; this cannot be checked here,
    so use it only for tasks built on the same inputs (e.g. one dataset, several templates).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(30, 5))
        >>> cross_task_linear_cka([x, 2 * x + 1, rng.normal(size=(20, 5))]).round(3)[0].tolist()
        [1.0, 1.0, nan]
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    out = np.full((len(arrays), len(arrays)), np.nan)
    for i, x in enumerate(arrays):
        for j in range(i, len(arrays)):
            y = arrays[j]
            if x.shape[0] == y.shape[0] and x.shape[0] >= (4 if debiased else 2):
                out[i, j] = out[j, i] = feature_space_linear_cka(x, y, debiased=debiased)
    return out


def pca_2d(x: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n 2"]:
    """Project rows onto their first two principal components (signs fixed for determinism).

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 6)) * [5, 2, 1, 1, 1, 1]
        >>> pca_2d(x).shape
        (50, 2)
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_2d needs a 2-D array with at least 2 rows, got shape {x.shape}.")
    centred = x - x.mean(0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    components = vt[:k]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(1)])
    coords = centred @ (components * signs[:, None]).T
    return np.pad(coords, ((0, 0), (0, 2 - k)))


def _conditional_probabilities(sq_dist: np.ndarray, perplexity: float, steps: int = 100) -> np.ndarray:
    """Row-wise Gaussian affinities whose entropy matches log(perplexity), by vectorised bisection."""
    n = sq_dist.shape[0]
    d = sq_dist.copy()
    np.fill_diagonal(d, np.inf)
    d -= d.min(1, keepdims=True)  # a shift per row cancels in the normalisation, and avoids underflow
    np.fill_diagonal(d, 0.0)
    off_diag = ~np.eye(n, dtype=bool)
    target = np.log(perplexity)
    beta, lo, hi = np.ones(n), np.zeros(n), np.full(n, np.inf)
    for _ in range(steps):
        p = np.exp(-d * beta[:, None]) * off_diag
        total = p.sum(1)
        entropy = np.log(total) + beta * (d * p).sum(1) / total
        too_flat = entropy > target  # too much entropy: narrow the kernel (raise beta)
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
    p = np.exp(-d * beta[:, None]) * off_diag
    return p / p.sum(1, keepdims=True)


def tsne_2d(
    x: Float[np.ndarray, "n d"],
    *,
    perplexity: float = 30.0,
    n_iter: int = 500,
    exaggeration_iter: int = 125,
    seed: int = 0,
) -> Float[np.ndarray, "n 2"]:
    """Exact t-SNE to two dimensions in NumPy (deterministic for a given ``seed``).

    The input is first reduced to at most 50 principal components (as is customary), then the
    standard gradient descent runs with early exaggeration 12, momentum 0.5 → 0.8, adaptive gains
    and learning rate ``max(n / 48, 50)``. ``perplexity`` is capped at ``(n - 1) / 3``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.concatenate([rng.normal(0, 1, (20, 10)), rng.normal(8, 1, (20, 10))])
        >>> tsne_2d(x, perplexity=5, n_iter=250).shape
        (40, 2)
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"t-SNE needs a 2-D array with at least 4 rows, got shape {x.shape}; use method='pca'.")
    if not np.all(np.isfinite(x)):
        raise ValueError("t-SNE input contains NaN/inf.")
    n = x.shape[0]
    centred = x - x.mean(0, keepdims=True)
    if centred.shape[1] > 50:
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        centred = u[:, :50] * s[:50]
    sum_sq = (centred**2).sum(1)
    sq_dist = np.maximum(sum_sq[:, None] + sum_sq[None, :] - 2 * centred @ centred.T, 0.0)
    perplexity = float(min(perplexity, max((n - 1) / 3.0, 1.0)))
    cond = _conditional_probabilities(sq_dist, perplexity)
    p = np.maximum((cond + cond.T) / (2 * n), 1e-12)

    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 1e-4, size=(n, 2))
    velocity, gains = np.zeros_like(y), np.ones_like(y)
    learning_rate = max(n / 48.0, 50.0)
    for it in range(n_iter):
        early = it < exaggeration_iter
        # Student-t kernel 1 / (1 + |y_i - y_j|²); outer differences beat a rank-2 matmul here.
        num = np.subtract.outer(y[:, 0], y[:, 0])
        num *= num
        dy = np.subtract.outer(y[:, 1], y[:, 1])
        dy *= dy
        num += dy
        num += 1.0
        np.reciprocal(num, out=num)
        np.fill_diagonal(num, 0.0)
        q = num / num.sum()
        np.maximum(q, 1e-12, out=q)
        weights = p * (12.0 if early else 1.0)
        weights -= q
        weights *= num
        grad = 4.0 * (weights.sum(1)[:, None] * y - weights @ y)
        same_sign = (grad > 0) == (velocity > 0)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        velocity = (0.5 if early else 0.8) * velocity - learning_rate * gains * grad
        y = y + velocity
        y -= y.mean(0, keepdims=True)
    return y


def embed_2d(
    x: Float[np.ndarray, "n d"], method: EmbeddingMethod = "tsne", *, seed: int = 0, **kwargs
) -> Float[np.ndarray, "n 2"]:
    """2-D coordinates of rows by ``"tsne"`` (:func:`tsne_2d`) or ``"pca"`` (:func:`pca_2d`).

    Example:
        >>> embed_2d(np.random.default_rng(0).normal(size=(10, 3)), "pca").shape
        (10, 2)
    """
    if method == "tsne":
        return tsne_2d(x, seed=seed, **kwargs)
    if method == "pca":
        return pca_2d(x)
    raise ValueError(f"unknown embedding method {method!r}: use 'tsne' or 'pca'.")
