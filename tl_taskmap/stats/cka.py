"""Linear CKA: dense NumPy references and an exact, mergeable streaming accumulator.

Which estimator to use
----------------------
* ``debiased=False`` (default) is the standard *biased* HSIC estimator of Kornblith et al. (2019).
  It is what the Layer-by-Layer paper (Zhao et al., 2024) reports, so use it to reproduce that
  paper. It is inflated when the number of examples ``n`` is small relative to the width ``d``:
  two independent Gaussian representations with ``n=64, d=512`` score about 0.9 (Murphy et al.,
  2024). Compare biased values only across settings with the same ``n`` and ``d``.
* ``debiased=True`` uses the unbiased HSIC estimator (Song et al., 2007; Kornblith's
  ``debiased=True``). It is close to 0 for independent data at any ``n``, so prefer it when
  ``n`` is not much larger than ``d``. It is an estimate, so it can come out slightly negative
  or slightly above 1; it is returned as is, never clipped.

The dense functions (``gram_linear``, ``gram_rbf``, ``center_gram``, ``cka_from_grams``,
``feature_space_linear_cka``) follow the google-research ``representation_similarity`` demo code
that the paper's ``analysis/cka.py`` copies; they are the references the streaming path is tested
against. ``StreamingLinearCKA`` computes the same feature-space values exactly from float64
sufficient statistics in O(d_x² + d_y² + d_x d_y) memory, whatever the number of examples.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.memory import compact
from tl_taskmap.state_io import FORMAT_VERSIONS

__all__ = [
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "cka_from_grams",
    "feature_space_linear_cka",
    "StreamingLinearCKA",
    "linear_cka",
]

FORMAT_VERSION = FORMAT_VERSIONS["accumulator"]


# --------------------------------------------------------------------------- dense references


def gram_linear(x: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n n"]:
    """Gram matrix of a linear kernel, ``x @ x.T``.

    >>> gram_linear(np.eye(2)).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    x = np.asarray(x, dtype=np.float64)
    return x.dot(x.T)


def gram_rbf(x: Float[np.ndarray, "n d"], threshold: float = 1.0) -> Float[np.ndarray, "n n"]:
    """Gram matrix of an RBF kernel whose bandwidth is ``threshold`` x the median distance.

    >>> g = gram_rbf(np.random.default_rng(0).normal(size=(5, 3)))
    >>> bool(np.allclose(np.diag(g), 1.0))
    True
    """
    x = np.asarray(x, dtype=np.float64)
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold**2 * sq_median_distance))


def center_gram(gram: Float[np.ndarray, "n n"], unbiased: bool = False) -> Float[np.ndarray, "n n"]:
    """Centre a symmetric Gram matrix; ``unbiased=True`` gives the U-statistic centring.

    >>> g = center_gram(gram_linear(np.arange(6.0).reshape(3, 2)))
    >>> bool(np.allclose(g.sum(0), 0))
    True
    """
    gram = np.array(gram, dtype=np.float64)  # a copy: the input is never modified
    if not np.allclose(gram, gram.T):
        raise ValueError("Input must be a symmetric matrix.")
    if unbiased:
        # Szekely & Rizzo (2014) U-centring, numerically steadier than Song et al. (2007).
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def cka_from_grams(
    gram_x: Float[np.ndarray, "n n"], gram_y: Float[np.ndarray, "n n"], debiased: bool = False
) -> float:
    """CKA between two Gram matrices (Kornblith's ``cka``); O(n²) memory.

    >>> x = np.random.default_rng(0).normal(size=(20, 4))
    >>> round(cka_from_grams(gram_linear(x), gram_linear(2 * x)), 6)
    1.0
    """
    gram_x = center_gram(gram_x, unbiased=debiased)
    gram_y = center_gram(gram_y, unbiased=debiased)
    # HSIC would divide by (n-1)² or n(n-3); the factor cancels in CKA.
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return float(scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y)))


def _debiased_dot_product_similarity_helper(xty, ssr_x_dot_ssr_y, squared_norm_x, squared_norm_y, n):
    """Unbiased linear HSIC (times n(n-3)) from centred statistics (Kornblith's helper).

    ``ssr_x_dot_ssr_y`` is Σ_i ‖x_i − x̄‖² ‖y_i − ȳ‖² (Kornblith passes the two row vectors).
    """
    return xty - n / (n - 2.0) * ssr_x_dot_ssr_y + squared_norm_x * squared_norm_y / ((n - 1) * (n - 2))


def feature_space_linear_cka(
    features_x: Float[np.ndarray, "n d_x"], features_y: Float[np.ndarray, "n d_y"], debiased: bool = False
) -> float:
    """Linear CKA computed in feature space (Kornblith's demo code), in float64.

    Inputs are converted to float64 first, as the Layer-by-Layer ``run_cka`` does.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(50, 8))
    >>> round(feature_space_linear_cka(x, x @ np.linalg.qr(rng.normal(size=(8, 8)))[0]), 8)
    1.0
    """
    features_x = np.asarray(features_x, dtype=np.float64)
    features_y = np.asarray(features_y, dtype=np.float64)
    features_x = features_x - np.mean(features_x, 0, keepdims=True)
    features_y = features_y - np.mean(features_y, 0, keepdims=True)
    dot_product_similarity = np.linalg.norm(features_x.T.dot(features_y)) ** 2
    normalization_x = np.linalg.norm(features_x.T.dot(features_x))
    normalization_y = np.linalg.norm(features_y.T.dot(features_y))
    if debiased:
        n = features_x.shape[0]
        ssr_x = np.einsum("ij,ij->i", features_x, features_x)
        ssr_y = np.einsum("ij,ij->i", features_y, features_y)
        sq_x, sq_y = np.sum(ssr_x), np.sum(ssr_y)
        helper = _debiased_dot_product_similarity_helper
        dot_product_similarity = helper(dot_product_similarity, ssr_x.dot(ssr_y), sq_x, sq_y, n)
        normalization_x = np.sqrt(helper(normalization_x**2, ssr_x.dot(ssr_x), sq_x, sq_x, n))
        normalization_y = np.sqrt(helper(normalization_y**2, ssr_y.dot(ssr_y), sq_y, sq_y, n))
    return float(dot_product_similarity / (normalization_x * normalization_y))


# --------------------------------------------------------------------------- shared helpers


def _as_float64_rows(x, name: str, width: int, device: torch.device) -> Tensor:
    """Validate a ``[n, width]`` batch and return it as float64 on ``device``."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [n_examples, {width}], got shape {tuple(x.shape)}. "
            "Reduce token positions first (e.g. last prompt token) or reshape to [batch*pos, d]."
        )
    if x.shape[1] != width:
        raise ValueError(
            f"{name} has feature width {x.shape[1]} but this accumulator was built for {width}; "
            "create it with the width of the hook you capture (e.g. d_model or d_mlp)."
        )
    # Cast before any arithmetic so that fp16/bf16 inputs never form products in low precision.
    return x.detach().to(device=device, dtype=torch.float64)


def save_state(path: str | os.PathLike, state: dict[str, Tensor], kind: str) -> None:
    """Write a state dict to safetensors (no pickle), tagging the accumulator kind."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, os.fspath(path), metadata={"kind": kind, "format_version": str(FORMAT_VERSION)})


def load_state(path: str | os.PathLike, kind: str) -> dict[str, Tensor]:
    """Read a state dict written by :func:`save_state`, checking the accumulator kind."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        found = (f.metadata() or {}).get("kind")
        if found != kind:
            raise ValueError(f"{os.fspath(path)!r} holds a {found!r} state, not a {kind!r} state.")
        return {k: f.get_tensor(k) for k in f.keys()}


class SafetensorsState:
    """What the streaming accumulators share: device following, ``state_dict`` / ``from_state_dict``, ``save`` / ``load``.

    A subclass keeps its float64 statistics in ``_stats`` (built by ``_zeros()``), its example count in
    ``_n``, names further int counters to save in ``_counters``, builds an empty accumulator of a state's
    shape in :meth:`_empty_like_state`, and does its arithmetic in ``_accumulate(*rows)``.

    **Deferred statistics.** The statistics are d×d matrices (CKA: three per pair of layers); for the
    few examples of a task (n = 80 on the default map, d = 576) the rows themselves are several times
    smaller. So ``add`` keeps its validated float64 rows as they are until they would outgrow the
    matrices (``_defer_rows`` rows), and the matrices are built on first need (any read of ``_stats``
    or ``_n``) by replaying the kept batches through ``_accumulate`` in order: the same operations on
    the same batches as without deferral, so the results are bit-identical.
    """

    _follow_input_device: bool
    device: torch.device
    #: Int attributes saved with the statistics besides ``n``.
    _counters: tuple[str, ...] = ()
    #: Rows kept unreduced before the statistics are built (0: never defer).
    _defer_rows: int = 0

    def _init_state(self) -> None:
        self._stats_: Optional[dict[str, Tensor]] = None  # built by _zeros() on first need
        self._n_ = 0
        self._pending: list[tuple[Tensor, ...]] = []
        self._pending_rows = 0

    def _zeros(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _accumulate(self, *rows: Tensor) -> None:
        raise NotImplementedError

    def _replay(self) -> None:
        pending, self._pending, self._pending_rows = self._pending, [], 0
        for rows in pending:
            self._accumulate(*rows)

    @property
    def _stats(self) -> dict[str, Tensor]:
        if self._pending:
            self._replay()
        if self._stats_ is None:
            self._stats_ = self._zeros()
        return self._stats_

    @_stats.setter
    def _stats(self, value: dict[str, Tensor]) -> None:
        self._stats_ = value

    @property
    def _n(self) -> int:
        if self._pending:
            self._replay()
        return self._n_

    @_n.setter
    def _n(self, value: int) -> None:
        self._n_ = value

    @property
    def n(self) -> int:
        """Number of examples accumulated (after dropping non-finite rows)."""
        return self._n_ + self._pending_rows

    def _add_rows(self, *rows: Tensor) -> None:
        """Accumulate validated float64 rows now, or keep them for later while that is the smaller state."""
        count = rows[0].shape[0]
        if self._stats_ is None and self._n_ == 0 and self._pending_rows + count <= self._defer_rows:
            self._pending.append(tuple(compact(r) for r in rows))  # kept rows must not pin the batch's activations
            self._pending_rows += count
        else:
            self._stats  # noqa: B018 - replays what is pending, in order, before this batch
            self._accumulate(*rows)

    def _follow_device(self, x: Any) -> None:
        """Before the first example: move the statistics to the device of ``x`` (when built with ``device=None``)."""
        if self._follow_input_device and self.n == 0 and isinstance(x, Tensor) and x.device != self.device:
            self.device = x.device
            if self._stats_ is not None:
                self._stats_ = {k: v.to(self.device) for k, v in self._stats_.items()}

    def _take_if_empty(self, other: Any) -> Optional[dict[str, Tensor]]:
        """``other``'s statistics on this device, or None once taken over whole because this one is empty."""
        theirs = {k: v.to(self.device, copy=True) for k, v in other._stats.items()}
        if self._n == 0:
            self._stats, self._n = theirs, other._n
            return None
        return theirs

    def state_dict(self) -> dict[str, Tensor]:
        """All statistics as tensors, plus ``n``, the counters (``n_dropped``) and ``format_version``."""
        state = {k: v.clone() for k, v in self._stats.items()}
        state.update(n=torch.tensor(self._n), **{c: torch.tensor(getattr(self, c)) for c in self._counters},
                     format_version=torch.tensor(FORMAT_VERSION))
        return state

    @classmethod
    def _empty_like_state(cls, state: dict[str, Tensor], device: str | torch.device | None) -> Any:
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: str | torch.device | None = None) -> Any:
        """Rebuild an accumulator from :meth:`state_dict` output."""
        check_format_version(state, cls.__name__)
        acc = cls._empty_like_state(state, device)
        missing = set(acc._stats) - set(state)
        if missing:
            raise ValueError(f"{cls.__name__} state is missing {sorted(missing)}.")
        acc._stats = {k: state[k].to(device=acc.device, dtype=torch.float64).clone() for k in acc._stats}
        acc._n = int(state["n"])
        for counter in cls._counters:
            setattr(acc, counter, int(state[counter]))
        return acc

    def save(self, path: str | os.PathLike) -> None:
        """Save to a ``.safetensors`` file (no pickle)."""
        save_state(path, self.state_dict(), type(self).__name__)  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Any:
        """Load an accumulator written by :meth:`save`."""
        return cls.from_state_dict(load_state(path, cls.__name__), device=device)  # type: ignore[attr-defined]


def check_format_version(state: dict[str, Tensor], kind: str) -> None:
    version = int(state.get("format_version", torch.tensor(-1)))
    if version != FORMAT_VERSION:
        raise ValueError(f"{kind} state has format_version {version}; this tl_taskmap reads {FORMAT_VERSION}.")


# --------------------------------------------------------------------------- streaming CKA

# Sufficient statistics, all of the shifted rows u = x − shift_x, v = y − shift_y, with a = ‖u‖²,
# b = ‖v‖². Shifting by the first batch's mean keeps the algebraic centring well conditioned when
# activations have a large common offset; CKA does not depend on the shift.
_SCALARS = ("sum_a", "sum_b", "sum_ab", "sum_aa", "sum_bb")
_VECTORS_X = ("shift_x", "sum_u", "sum_bu", "sum_au")
_VECTORS_Y = ("shift_y", "sum_v", "sum_av", "sum_bv")


def _shift_stats(s: dict[str, Tensor], n: int, dx: Tensor, dy: Tensor) -> dict[str, Tensor]:
    """Statistics of the shifted rows (u + dx, v + dy), from those of (u, v).

    With a' = ‖u + dx‖² = a + 2 dx·u + ‖dx‖² (b' likewise) every sum expands into stored sums;
    e.g. Σ a'b' needs Σ ab, Σ a v, Σ b u and UᵀV. Centring is the shift dx = −ū, dy = −v̄.
    """
    su, sv, sa, sb = s["sum_u"], s["sum_v"], s["sum_a"], s["sum_b"]
    ex, ey = dx @ dx, dy @ dy
    dx_su, dy_sv = dx @ su, dy @ sv
    uu_dx, vv_dy, uv_dy, vu_dx = s["utu"] @ dx, s["vtv"] @ dy, s["utv"] @ dy, s["utv"].T @ dx
    new_sa, new_sb = sa + 2 * dx_su + n * ex, sb + 2 * dy_sv + n * ey

    def outer_sum(m, d1, s1, d2, s2):  # Σ (p + d1)(q + d2)ᵀ from m = Σ p qᵀ, s1 = Σ p, s2 = Σ q
        return m + torch.outer(d1, s2) + torch.outer(s1, d2) + n * torch.outer(d1, d2)

    return {
        "shift_x": s["shift_x"] - dx,
        "shift_y": s["shift_y"] - dy,
        "sum_u": su + n * dx,
        "sum_v": sv + n * dy,
        "utu": outer_sum(s["utu"], dx, su, dx, su),
        "vtv": outer_sum(s["vtv"], dy, sv, dy, sv),
        "utv": outer_sum(s["utv"], dx, su, dy, sv),
        "sum_a": new_sa,
        "sum_b": new_sb,
        "sum_aa": s["sum_aa"] + 4 * (dx @ uu_dx) + 4 * (dx @ s["sum_au"]) + 2 * ex * sa + 4 * ex * dx_su
        + n * ex**2,
        "sum_bb": s["sum_bb"] + 4 * (dy @ vv_dy) + 4 * (dy @ s["sum_bv"]) + 2 * ey * sb + 4 * ey * dy_sv
        + n * ey**2,
        "sum_ab": s["sum_ab"] + 2 * (dy @ s["sum_av"]) + 2 * (dx @ s["sum_bu"]) + 4 * (dx @ uv_dy)
        + ey * sa + ex * sb + 2 * ey * dx_su + 2 * ex * dy_sv + n * ex * ey,
        "sum_au": s["sum_au"] + 2 * uu_dx + ex * su + dx * new_sa,
        "sum_bv": s["sum_bv"] + 2 * vv_dy + ey * sv + dy * new_sb,
        "sum_bu": s["sum_bu"] + 2 * uv_dy + ey * su + dx * new_sb,
        "sum_av": s["sum_av"] + 2 * vu_dx + ex * sv + dy * new_sa,
    }


class StreamingLinearCKA(SafetensorsState):
    """Exact feature-space linear CKA between two representations, fed in batches.

    Rows are examples and are matched between ``x`` and ``y``; a row with NaN/inf in either is
    dropped from both (counted in ``n_dropped``). Everything is computed in float64. Accumulators
    built on different shards ``merge`` exactly, and ``save``/``load`` use safetensors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 8, generator=g)
        >>> rotation = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
        >>> acc = StreamingLinearCKA(d_x=8, d_y=8)
        >>> for xb in x.split(30):  # same examples through both "models"
        ...     _ = acc.add(xb, 2 * xb @ rotation + 1)
        >>> acc
        StreamingLinearCKA(d_x=8, d_y=8, n=100, n_dropped=0, device=cpu)
        >>> round(acc.cka(), 8), round(acc.cka(debiased=True), 8)
        (1.0, 1.0)
    """

    _counters = ("n_dropped",)

    @property
    def _defer_rows(self) -> int:  # rows of x and y cost (d_x + d_y) per example, the statistics ~ d_x² + d_x·d_y + d_y²
        return self.d_x + self.d_y

    def __init__(self, d_x: int, d_y: int, device: str | torch.device | None = None):
        if int(d_x) < 1 or int(d_y) < 1:
            raise ValueError(f"d_x and d_y must be positive feature widths, got d_x={d_x}, d_y={d_y}.")
        self.d_x, self.d_y = int(d_x), int(d_y)
        # device=None: statistics follow the device of the first batch added.
        self._follow_input_device = device is None
        self.device = torch.device("cpu" if device is None else device)
        self.n_dropped = 0
        self._warned = set()
        self._init_state()

    def _zeros(self) -> dict[str, Tensor]:
        kw = dict(dtype=torch.float64, device=self.device)
        stats = {k: torch.zeros((), **kw) for k in _SCALARS}
        stats.update({k: torch.zeros(self.d_x, **kw) for k in _VECTORS_X})
        stats.update({k: torch.zeros(self.d_y, **kw) for k in _VECTORS_Y})
        shapes = {"utu": (self.d_x, self.d_x), "vtv": (self.d_y, self.d_y), "utv": (self.d_x, self.d_y)}
        stats.update({k: torch.zeros(shape, **kw) for k, shape in shapes.items()})
        return stats

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def add(self, x: Float[Tensor, "n d_x"], y: Float[Tensor, "n d_y"]) -> "StreamingLinearCKA":
        """Accumulate one batch of matched examples (row i of ``x`` and ``y`` is one example)."""
        self._follow_device(x)
        x = _as_float64_rows(x, "x", self.d_x, self.device)
        y = _as_float64_rows(y, "y", self.d_y, self.device)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x has {x.shape[0]} rows but y has {y.shape[0]}; rows must be the same examples in "
                "the same order. Capture both models on the same batch of prompts."
            )
        keep = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
        n_bad = int((~keep).sum())
        if n_bad:
            self.n_dropped += n_bad
            self._warn_once("nonfinite", f"dropped {n_bad} example(s) with NaN/inf from both x and y "
                            "(typical of fp16 inference); see n_dropped for the running count.")
            x, y = x[keep], y[keep]
        if x.shape[0] == 0:
            return self
        self._add_rows(x, y)
        return self

    def _accumulate(self, x: Tensor, y: Tensor) -> None:
        s = self._stats
        if self._n == 0:
            s["shift_x"], s["shift_y"] = x.mean(0), y.mean(0)
        u, v = x - s["shift_x"], y - s["shift_y"]
        a, b = (u * u).sum(1), (v * v).sum(1)
        s["sum_u"] += u.sum(0)
        s["sum_v"] += v.sum(0)
        s["utu"] += u.T @ u
        s["vtv"] += v.T @ v
        s["utv"] += u.T @ v
        s["sum_a"] += a.sum()
        s["sum_b"] += b.sum()
        s["sum_ab"] += a @ b
        s["sum_aa"] += a @ a
        s["sum_bb"] += b @ b
        s["sum_au"] += a @ u
        s["sum_bu"] += b @ u
        s["sum_av"] += a @ v
        s["sum_bv"] += b @ v
        self._n += x.shape[0]

    def merge(self, other: "StreamingLinearCKA") -> "StreamingLinearCKA":
        """Add another accumulator's examples to this one, exactly (in place; returns ``self``)."""
        if not isinstance(other, StreamingLinearCKA) or (other.d_x, other.d_y) != (self.d_x, self.d_y):
            raise ValueError(
                f"can only merge a StreamingLinearCKA with d_x={self.d_x}, d_y={self.d_y}; got {other!r}."
            )
        self.n_dropped += other.n_dropped
        if other._n == 0:
            return self
        theirs = self._take_if_empty(other)
        if theirs is None:
            return self
        # Re-express the other statistics about this accumulator's shift, then add.
        theirs = _shift_stats(theirs, other._n, theirs["shift_x"] - self._stats["shift_x"],
                              theirs["shift_y"] - self._stats["shift_y"])
        for k, v in theirs.items():
            if not k.startswith("shift"):
                self._stats[k] = self._stats[k] + v
        self._n += other._n
        return self

    def _centred(self) -> dict[str, Tensor]:
        s = self._stats
        return _shift_stats(s, self._n, -s["sum_u"] / self._n, -s["sum_v"] / self._n)

    def _check_not_constant(self, c: dict[str, Tensor], side: str) -> None:
        u, sq, shift = ("sum_u", "sum_a", "shift_x") if side == "x" else ("sum_v", "sum_b", "shift_y")
        s = self._stats
        raw = s[sq] + 2 * (s[shift] @ s[u]) + self._n * (s[shift] @ s[shift])  # Σ‖row‖² before shifting
        if float(c[sq]) <= 1e-24 * float(raw):
            raise ValueError(
                f"{side} is constant across all {self._n} examples (zero variance), so CKA is undefined. "
                "Check that the hook fired and that the examples differ."
            )

    def cka(self, debiased: bool = False) -> float:
        """Linear CKA of everything added so far (see the module docstring for the estimators).

        ``debiased=True`` returns the unbiased-HSIC estimate as is: it may be slightly negative or
        above 1 from estimator variance. Raises ``ValueError`` when it is undefined.
        """
        n = self._n
        need = 4 if debiased else 2
        if n < need:
            raise ValueError(
                f"{'debiased' if debiased else 'biased'} CKA needs at least {need} examples, got n={n}"
                + (" ((n-1)(n-2)(n-3) is degenerate for n <= 3)" if debiased else "") + "; add more examples."
            )
        c = self._centred()
        self._check_not_constant(c, "x")
        self._check_not_constant(c, "y")
        xty = torch.linalg.matrix_norm(c["utv"]) ** 2
        xtx = torch.linalg.matrix_norm(c["utu"]) ** 2
        yty = torch.linalg.matrix_norm(c["vtv"]) ** 2
        if not debiased:
            if n < min(self.d_x, self.d_y):
                self._warn_once("small_n", f"biased CKA with n={n} examples < width {min(self.d_x, self.d_y)} "
                                "is inflated (Murphy et al. 2024); consider cka(debiased=True).")
            return float(xty / torch.sqrt(xtx * yty))
        helper = _debiased_dot_product_similarity_helper
        hsic_xy = helper(xty, c["sum_ab"], c["sum_a"], c["sum_b"], n)
        hsic_xx = helper(xtx, c["sum_aa"], c["sum_a"], c["sum_a"], n)
        hsic_yy = helper(yty, c["sum_bb"], c["sum_b"], c["sum_b"], n)
        # Mathematically >= 0 (a squared norm of the U-centred Gram matrix); 0 e.g. when all rows
        # but one are identical. Values at round-off level relative to the biased term count as 0.
        if float(hsic_xx) <= 1e-12 * float(xtx) or float(hsic_yy) <= 1e-12 * float(yty):
            raise ValueError(
                f"the debiased self-similarity estimate is not positive (HSIC(x,x)={float(hsic_xx):.3g}, "
                f"HSIC(y,y)={float(hsic_yy):.3g}) with n={n}, so debiased CKA is undefined; "
                "add more examples or use debiased=False."
            )
        return float(hsic_xy / torch.sqrt(hsic_xx * hsic_yy))

    @classmethod
    def _empty_like_state(cls, state: dict[str, Tensor], device: str | torch.device | None) -> "StreamingLinearCKA":
        return cls(state["utv"].shape[0], state["utv"].shape[1], device=device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(d_x={self.d_x}, d_y={self.d_y}, n={self.n}, "
                f"n_dropped={self.n_dropped}, device={self.device})")


def linear_cka(x: Float[Tensor, "n d_x"], y: Float[Tensor, "n d_y"], debiased: bool = False) -> float:
    """Linear CKA of two full activation matrices through the streaming (float64) path.

    >>> x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    >>> round(linear_cka(x, 3 * x + 1), 10)
    1.0
    """
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 2 or np.ndim(y) != 2:
        raise ValueError(
            f"x and y must be 2-D [n_examples, d]; got shapes {tuple(x.shape)} and {tuple(np.shape(y))}."
        )
    acc = StreamingLinearCKA(x.shape[1], y.shape[1], device=x.device)
    return acc.add(x, y).cka(debiased=debiased)
