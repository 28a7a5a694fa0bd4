"""Split per-layer CKA curves into shared → transition → refinement layer sections.

Zhao et al. (2024) describe instruction-tuned Llama-2-7B (layers 1–32) as having *shared* layers
1–9, where its CKA with single-task control models is not above the pre-trained model's; a
*transition* 10–15, where its CKA rises sharply and is high with all control models; and
*refinement* layers 16–32, where high CKA continues to a lesser extent. For unseen tasks they find
no transition. ``detect_sections`` turns that description into a deterministic rule, stated in
full in its docstring and echoed in ``LayerSections.rule``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from jaxtyping import Float

__all__ = ["LayerSections", "detect_sections"]

Range = tuple[int, int]


@dataclass(frozen=True)
class LayerSections:
    """Layer sections as inclusive ``(first, last)`` layer labels, or ``None`` when absent.

    ``reason`` says why a section is missing (``None`` when all three were found); ``rule`` states
    the rule and thresholds that produced the result.
    """

    shared: Range | None
    transition: Range | None
    refinement: Range | None
    rule: str
    reason: str | None = None
    layers: tuple[int, ...] = ()

    def section_of(self, layer: int) -> str | None:
        """Name of the section holding ``layer`` (``"shared"``, ``"transition"``, ``"refinement"``)."""
        for name in ("shared", "transition", "refinement"):
            span = getattr(self, name)
            if span is not None and span[0] <= layer <= span[1]:
                return name
        return None

    def to_dict(self) -> dict:
        """Plain-Python dict (JSON-serialisable)."""
        d = asdict(self)
        for name in ("shared", "transition", "refinement"):
            d[name] = None if d[name] is None else list(d[name])
        d["layers"] = list(self.layers)
        return d

    def __repr__(self) -> str:
        def fmt(span):
            return "None" if span is None else f"{span[0]}-{span[1]}"

        tail = f", reason={self.reason!r}" if self.reason else ""
        return (f"LayerSections(shared={fmt(self.shared)}, transition={fmt(self.transition)}, "
                f"refinement={fmt(self.refinement)}{tail})")


def _task_mean(curve, name: str) -> np.ndarray:
    arr = np.asarray(curve, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(f"{name} must be [layer] or [task, layer], got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN/inf; compute CKA for every layer (and task) first.")
    return arr.mean(0) if arr.ndim == 2 else arr


def detect_sections(
    tuned_curve: Float[np.ndarray, "*task layer"],
    base_curve: Float[np.ndarray, "*task layer"] | None = None,
    *,
    layers: Sequence[int] | None = None,
    shared_tol: float = 0.0,
    band: float = 0.25,
    min_gain: float = 0.02,
) -> LayerSections:
    """Find shared, transition and refinement layers from per-layer CKA curves.

    ``tuned_curve`` is CKA(multi-task tuned model, control model) per layer, as ``[layer]`` or
    ``[task, layer]``; ``base_curve`` the same for the pre-trained model. 2-D input is averaged
    over tasks first; call ``t`` the tuned mean, ``b`` the base mean. ``layers`` labels the
    positions (default ``0 .. L-1``; pass ``range(1, 33)`` for the paper's numbering).

    Rule (deterministic; ties go to the earliest layer):

    1. *Shared* (needs ``base_curve``): the longest leading run of layers with
       ``t - b <= shared_tol``. Without a base curve, the leading layers before the transition.
    2. Let ``R`` be the layers after the shared run, ``p`` the first layer of ``R`` where ``t`` is
       largest, and ``floor`` the smallest ``t`` in ``R``. The *peak band* is the contiguous run
       of layers around ``p`` with ``t >= t[p] - band * (t[p] - floor)``.
    3. *Transition*: from the first layer of ``R`` (without a base curve: the first layer of the
       peak band) to the last layer of the peak band: the rise and the plateau of high CKA.
    4. *Refinement*: the layers after the transition.
    5. There is no transition (``transition is None``, ``reason`` says which test failed) when
       ``R`` is empty; when ``t[p] - floor < min_gain`` (no rise); with a base curve, when
       ``t[p] - b[p] < min_gain`` (not above the pre-trained model at the peak); or when the peak
       band reaches the last layer (no later drop, so nothing separates a transition from
       refinement: the unseen-task pattern). Then, with a base curve, ``R`` is the refinement;
       without one, no section is reported.

    Without ``base_curve`` the rule sees only the tuned curve's own peak: early layers that are
    high for every model (as with LoRA fine-tunes of one base) can then read as the transition.
    Pass the pre-trained model's curve to reproduce the paper's analysis.

    Example (the paper's Llama-2-7B shape):
        >>> layers = range(1, 33)
        >>> base = np.linspace(0.9, 0.5, 32)
        >>> tuned = base.copy()
        >>> tuned[:9] -= 0.03
        >>> tuned[9:15] = [0.80, 0.87, 0.92, 0.95, 0.95, 0.94]
        >>> tuned[15:] = np.linspace(0.85, 0.75, 17)
        >>> detect_sections(tuned, base, layers=layers)
        LayerSections(shared=1-9, transition=10-15, refinement=16-32)
    """
    t = _task_mean(tuned_curve, "tuned_curve")
    n_layers = t.shape[0]
    b = None if base_curve is None else _task_mean(base_curve, "base_curve")
    if b is not None and b.shape != t.shape:
        raise ValueError(f"base_curve has {b.shape[0]} layers but tuned_curve has {n_layers}.")
    labels = tuple(range(n_layers)) if layers is None else tuple(int(layer) for layer in layers)
    if len(labels) != n_layers:
        raise ValueError(f"layers has {len(labels)} labels but the curves have {n_layers} layers.")
    if any(later <= earlier for earlier, later in zip(labels, labels[1:])):
        raise ValueError("layers must be strictly increasing.")
    if band < 0 or min_gain < 0:
        raise ValueError(f"band and min_gain must be >= 0, got band={band}, min_gain={min_gain}.")

    rule = (
        f"[task, layer] curves averaged over tasks; shared = leading layers with tuned - base <= {shared_tol}"
        + ("" if b is not None else " (no base curve: leading layers before the transition)")
        + f"; peak band = contiguous layers around the post-shared maximum with tuned >= max - {band} * "
        f"(max - post-shared min); transition = {'first layer after shared' if b is not None else 'band start'} "
        f"to band end, needing rise >= {min_gain}"
        + (f", tuned - base at the peak >= {min_gain}" if b is not None else "")
        + " and a later drop below the band; refinement = the rest."
    )

    def span(lo: int, hi: int) -> Range | None:
        return (labels[lo], labels[hi]) if lo <= hi else None

    start = 0  # index of the first layer after the shared run
    if b is not None:
        not_shared = np.nonzero(t - b > shared_tol)[0]
        start = int(not_shared[0]) if not_shared.size else n_layers
    shared = span(0, start - 1) if b is not None else None

    def no_transition(reason: str) -> LayerSections:
        refinement = span(start, n_layers - 1) if b is not None else None
        return LayerSections(shared, None, refinement, rule, reason, labels)

    if start == n_layers:
        return no_transition(f"tuned CKA is never above base by more than shared_tol={shared_tol}.")
    region = t[start:]
    peak = start + int(np.argmax(region))
    rise = t[peak] - float(region.min())
    if rise < min_gain:
        return no_transition(f"tuned CKA after the shared layers varies by only {rise:.3g} < min_gain={min_gain}.")
    if b is not None and t[peak] - b[peak] < min_gain:
        return no_transition(f"at its peak (layer {labels[peak]}) tuned CKA is only {t[peak] - b[peak]:.3g} "
                             f"above base, < min_gain={min_gain}.")
    threshold = t[peak] - band * rise
    lo = hi = peak
    while lo - 1 >= start and t[lo - 1] >= threshold:
        lo -= 1
    while hi + 1 < n_layers and t[hi + 1] >= threshold:
        hi += 1
    if hi == n_layers - 1:
        return no_transition(f"tuned CKA stays within the peak band (>= {threshold:.3g}) up to the last layer, "
                             "so no drop separates a transition from refinement.")
    first = start if b is not None else lo
    if b is None:
        shared = span(0, first - 1)
    return LayerSections(shared, span(first, hi), span(hi + 1, n_layers - 1), rule, None, labels)
