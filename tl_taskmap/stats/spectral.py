"""Streaming covariance spectra: eigenvalues, dimensions for 99% variance, participation ratio.

The Layer-by-Layer line of work (MOSSA, Zhao et al.) summarises a layer by how many principal
directions of its mean-centred activations explain 99% of the variance. ``StreamingCovariance``
gets that number from a float64 covariance accumulated batch by batch (O(d²) memory), and it
equals the count from an SVD of the full centred activation matrix: the eigenvalues of the
covariance are the squared singular values divided by n − 1.
"""

from __future__ import annotations


from typing import Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .cka import FORMAT_VERSION, SafetensorsState, _as_float64_rows, check_format_version  # noqa: F401 - FORMAT_VERSION, check_format_version re-exported

__all__ = ["StreamingCovariance", "dims_for_variance_from_eigenvalues", "dims_cap", "capped_dims"]


def dims_cap(n_examples: int, d: int) -> int:
    """The most dimensions a ``dims_for_variance`` count can reach: ``min(n − 1, d)``.

    n examples span at most n − 1 directions after mean-centring, so at small n the 99% count sits at
    n − 1 whatever the layer does: it is then a property of the sample size, not a finding.

    >>> dims_cap(12, 576), dims_cap(1000, 576)
    (11, 576)
    """
    if n_examples < 1 or d < 1:
        raise ValueError(f"dims_cap needs n_examples ≥ 1 and d ≥ 1, got {n_examples}, {d}")
    return min(n_examples - 1, d)


def capped_dims(dims: Float[np.ndarray, "*shape"], n_examples: Float[np.ndarray, "*shape"] | int, d: int,
                slack: int = 0) -> np.ndarray:
    """Boolean mask of counts that reached the cap ``min(n − 1, d) − slack`` (not readable as a trend).

    >>> capped_dims(np.array([3, 11, 11]), 12, 576).tolist()
    [False, True, True]
    """
    n = np.broadcast_to(np.asarray(n_examples), np.shape(dims))
    cap = np.minimum(n - 1, d) - slack
    return np.asarray(dims, dtype=np.float64) >= cap


def dims_for_variance_from_eigenvalues(eigs: Float[np.ndarray, " k"] | Tensor, fraction: float = 0.99) -> int:
    """Smallest k whose k largest eigenvalues explain at least ``fraction`` of their total.

    Eigenvalues at round-off level (≤ len · eps · max, the usual numerical-rank tolerance, and any
    negative ones) count as 0, so ``fraction=1.0`` gives the numerical rank, not ``d``.

    >>> dims_for_variance_from_eigenvalues(np.array([5.0, 3.0, 1.5, 0.5]), 0.9)
    3
    >>> dims_for_variance_from_eigenvalues([1.0, 1.0, 0.0], 1.0)
    2
    """
    if isinstance(eigs, Tensor):
        eigs = eigs.detach().cpu().numpy()
    eigs = np.asarray(eigs, dtype=np.float64).ravel()
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if eigs.size == 0 or not np.all(np.isfinite(eigs)):
        raise ValueError("eigenvalues must be a non-empty array of finite numbers.")
    eigs = np.sort(np.clip(eigs, 0.0, None))[::-1]
    eigs[eigs <= eigs.size * np.finfo(np.float64).eps * eigs[0]] = 0.0
    total = eigs.sum()
    if total <= 0:
        raise ValueError("all eigenvalues are 0 (constant data): no variance to explain.")
    cumulative = np.cumsum(eigs)
    k = int(np.searchsorted(cumulative, fraction * total, side="left")) + 1
    # With fraction=1 round-off can leave cumulative[-1] a hair below total; stop at the last
    # nonzero eigenvalue rather than counting zero-variance directions.
    return min(k, int(np.count_nonzero(eigs)))


class StreamingCovariance(SafetensorsState):
    """Float64 mean and covariance of ``[n, d]`` batches, mergeable and saveable.

    Example:
        >>> scales = torch.tensor([9.0, 3.0, 1.0, 0.1, 0.1, 0.1])  # variances ~81, 9, 1, ...
        >>> x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * scales
        >>> cov = StreamingCovariance(6)
        >>> for batch in x.split(128):
        ...     _ = cov.add(batch)
        >>> cov
        StreamingCovariance(d=6, n=500, device=cpu)
        >>> cov.dims_for_variance(0.99), cov.dims_for_variance(0.9)
        (3, 2)
    """

    def __init__(self, d: int, device: str | torch.device | None = None):
        if int(d) < 1:
            raise ValueError(f"d must be a positive feature width, got {d}.")
        self.d = int(d)
        # device=None: statistics follow the device of the first batch added.
        self._follow_input_device = device is None
        self.device = torch.device("cpu" if device is None else device)
        self._init_state()

    @property
    def _defer_rows(self) -> int:  # rows cost d per example, the statistics d²
        return self.d

    def _zeros(self) -> dict[str, Tensor]:
        kw = dict(dtype=torch.float64, device=self.device)
        # Rows are stored shifted by the first batch's mean (u = x − shift) so that a large common
        # offset does not cancel catastrophically when the covariance is formed.
        return {"shift": torch.zeros(self.d, **kw), "sum_u": torch.zeros(self.d, **kw), "utu": torch.zeros(self.d, self.d, **kw)}

    def add(self, x: Float[Tensor, "n d"]) -> "StreamingCovariance":
        """Accumulate one batch of examples. Rows with NaN/inf raise ``ValueError``."""
        self._follow_device(x)
        x = _as_float64_rows(x, "x", self.d, self.device)
        bad = ~torch.isfinite(x).all(1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).ravel()[:5].tolist()
            raise ValueError(
                f"the input has {int(bad.sum())} NaN/inf row(s) (first: {rows}); drop or fix them before "
                "add() (e.g. x[torch.isfinite(x).all(1)]), since a covariance cannot skip them silently."
            )
        if x.shape[0] == 0:
            return self
        self._add_rows(x)
        return self

    def _accumulate(self, x: Tensor) -> None:
        s = self._stats
        if self._n == 0:
            s["shift"] = x.mean(0)
        u = x - s["shift"]
        s["sum_u"] += u.sum(0)
        s["utu"] += u.T @ u
        self._n += x.shape[0]

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        """Add another accumulator's examples to this one, exactly (in place; returns ``self``)."""
        if not isinstance(other, StreamingCovariance) or other.d != self.d:
            raise ValueError(f"can only merge a StreamingCovariance with d={self.d}; got {other!r}.")
        if other._n == 0:
            return self
        theirs = self._take_if_empty(other)
        if theirs is None:
            return self
        # Their rows about our shift: u = u_other + delta.
        delta, n_o, su = theirs["shift"] - self._stats["shift"], other._n, theirs["sum_u"]
        self._stats["sum_u"] = self._stats["sum_u"] + su + n_o * delta
        self._stats["utu"] = (self._stats["utu"] + theirs["utu"] + torch.outer(delta, su)
                              + torch.outer(su, delta) + n_o * torch.outer(delta, delta))
        self._n += n_o
        return self

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"need at least {k} examples, got n={self.n}; add more examples.")

    def _gram_of_kept_rows(self) -> Optional[Float[Tensor, "n n"]]:
        """``Xc Xcᵀ / (n − 1)`` of the centred rows while they are still kept (n ≤ d), else None.

        Its nonzero eigenvalues are the covariance's (``Xcᵀ Xc / (n − 1)`` has the same ones), so the
        spectrum of a few examples costs an n×n eigendecomposition instead of a d×d one.
        """
        if self._stats_ is not None or not self._pending:
            return None
        x = torch.cat([rows[0] for rows in self._pending])
        centred = x - x.mean(0)
        gram = centred @ centred.T / (x.shape[0] - 1)
        return (gram + gram.T) / 2

    @property
    def mean(self) -> Float[Tensor, " d"]:
        """Float64 mean of the examples."""
        self._need(1)
        return self._stats["shift"] + self._stats["sum_u"] / self._n

    def covariance(self) -> Float[Tensor, "d d"]:
        """Float64 sample covariance with the n − 1 denominator (as ``np.cov``)."""
        self._need(2)
        su = self._stats["sum_u"]
        cov = (self._stats["utu"] - torch.outer(su, su) / self._n) / (self._n - 1)
        return (cov + cov.T) / 2  # exactly symmetric for eigvalsh

    def eigenvalues(self) -> Float[Tensor, " d"]:
        """Covariance eigenvalues, descending, with round-off negatives clipped to 0.

        With at most ``d`` examples (kept as rows, see :class:`~tl_taskmap.stats.cka.SafetensorsState`)
        they come from the n×n Gram matrix of the centred rows, padded with the d − n zero eigenvalues.
        """
        self._need(2)
        gram = self._gram_of_kept_rows()
        if gram is None:
            return torch.linalg.eigvalsh(self.covariance()).flip(0).clamp_min(0.0)
        eigs = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
        return torch.cat([eigs, eigs.new_zeros(self.d - eigs.shape[0])])

    def dims_for_variance(self, fraction: float = 0.99) -> int:
        """Smallest k with cumulative explained variance ≥ ``fraction`` (the paper's 99% count)."""
        return dims_for_variance_from_eigenvalues(self.eigenvalues(), fraction)

    def participation_ratio(self) -> float:
        """(Σλ)² / Σλ² of the covariance eigenvalues, between 1 and d.

        Computed as trace(C)² / ‖C‖_F², which needs no eigendecomposition (and equals the same ratio of
        the n×n Gram matrix of the centred rows, used while they are kept).
        """
        self._need(2)
        gram = self._gram_of_kept_rows()
        matrix = self.covariance() if gram is None else gram
        frob2 = float((matrix * matrix).sum())
        if frob2 <= 0:
            raise ValueError("the covariance is zero (constant data); the participation ratio is undefined.")
        return float(torch.trace(matrix)) ** 2 / frob2

    @classmethod
    def _empty_like_state(cls, state: dict[str, Tensor], device: str | torch.device | None) -> "StreamingCovariance":
        return cls(state["utu"].shape[0], device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, n={self.n}, device={self.device})"
