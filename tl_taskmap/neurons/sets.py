"""Immutable sets of model units: FFN neurons (:class:`NeuronSet`) and attention heads (:class:`HeadSet`).

A neuron is ``(layer, index)`` with ``index`` in ``[0, d_mlp)`` — the intermediate unit of the MLP
(``mlp.hook_post``), as in Leng & Xiong (2024). A head is ``(layer, head)`` with ``head`` in
``[0, n_heads)`` — a *query* head, whose output is its slice of ``attn.hook_z`` (see
:mod:`tl_taskmap.neurons.heads`). Both are thin kinds of :class:`~tl_taskmap.neurons.units.UnitSet`,
which holds top-k% selection, set algebra, Jaccard overlap, matched random sets and JSON /
safetensors I/O once for every unit kind. Overlap analysis across tasks lives in
:mod:`tl_taskmap.neurons.overlap`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch  # noqa: F401 - the doctests use it
from jaxtyping import Bool
from torch import Tensor

from tl_taskmap.neurons.units import FORMAT_VERSION, UnitSet

__all__ = ["FORMAT_VERSION", "HeadSet", "NeuronSet", "UnitSet"]


class NeuronSet(UnitSet):
    """An immutable set of FFN neurons ``(layer, index)`` for a model with ``n_layers`` x ``d_mlp``.

    Indices per layer are stored sorted and unique (duplicates in the input are dropped); layers
    not given are empty. ``name`` and ``meta`` (a JSON-able dict: task, k, selection mode, ...)
    travel with the set through ``save``/``load`` but are ignored by ``==`` and set algebra,
    whose results carry no name.

    Example:
        >>> a = NeuronSet(2, 8, {0: [1, 3], 1: [0]}, name="sst2")
        >>> b = NeuronSet(2, 8, {0: [3, 4]})
        >>> len(a | b), len(a & b), (0, 3) in a, a.counts_per_layer()
        (4, 1, True, [2, 1])
        >>> round(a.jaccard(b), 3)
        0.25
        >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [3.0, 2.0, 1.0, 0.0]])
        >>> NeuronSet.top_k(scores, 0.5).to_dataframe().values.tolist()   # the paper's top-k% relevance: k=10 -> 0.1
        [[0, 1], [0, 2], [1, 0], [1, 1]]
        >>> NeuronSet.top_k(scores, 0.25, per_layer=False).to_dataframe().values.tolist()
        [[1, 0], [1, 1]]
        >>> NeuronSet(n_layers=2, d_mlp=8).d_mlp   # the size under its own name
        8
        >>> NeuronSet.empty(2, 8).check_compatible(2, 4)
        Traceback (most recent call last):
        ValueError: NeuronSet was built for d_mlp=8 but the model has d_mlp=4 (layer 0)
    """

    UNIT = "neuron"
    SIZE = "d_mlp"
    COLUMN = "neuron"
    __slots__ = ()

    @classmethod
    def from_mask(
        cls, mask: Bool[Tensor, "n_layers d_mlp"], name: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> NeuronSet:
        """Build a set from a boolean mask, True where a neuron is selected.

        Example:
            >>> NeuronSet.from_mask(torch.tensor([[True, False], [False, False]])).to_dataframe().values.tolist()
            [[0, 0]]
        """
        return super().from_mask(mask, name=name, meta=meta)

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int) -> NeuronSet:
        """The empty set. Example: ``len(NeuronSet.empty(2, 8)) == 0``."""
        return cls(n_layers, d_mlp)

    @classmethod
    def full(cls, n_layers: int, d_mlp: int) -> NeuronSet:
        """Every neuron of the model. Example: ``len(NeuronSet.full(2, 8)) == 16``."""
        return super().full(n_layers, d_mlp)

    @property
    def d_mlp(self) -> int:
        """Neurons per layer of the model shape."""
        return self._size

    def check_compatible(self, n_layers: int, d_mlp: int | Sequence[int]) -> None:
        """Raise ValueError unless this set fits a model with ``n_layers`` layers of ``d_mlp`` neurons.

        ``d_mlp`` may be one int or one size per layer. Example: ``NeuronSet.empty(2, 8).check_compatible(2, 8)``.
        """
        super().check_compatible(n_layers, d_mlp)


class HeadSet(UnitSet):
    """An immutable set of attention heads ``(layer, head)`` for a model with ``n_layers`` x ``n_heads``.

    Heads are query heads (``cfg.n_heads``): with grouped-query attention several query heads share a
    key/value head, but each has its own output (its slice of ``hook_z`` and its rows of ``W_O``), so
    each is a unit of its own. Same algebra, overlap, random baselines and I/O as :class:`NeuronSet`.

    Example:
        >>> a = HeadSet(2, 9, {0: [1, 3], 1: [0]}, name="sst2")
        >>> b = HeadSet(2, 9, {0: [3, 4]})
        >>> len(a | b), len(a & b), (0, 3) in a, a.counts_per_layer()
        (4, 1, True, [2, 1])
        >>> a.random_like(seed=0).counts_per_layer()
        [2, 1]
    """

    UNIT = "head"
    SIZE = "n_heads"
    COLUMN = "head"
    __slots__ = ()

    @property
    def n_heads(self) -> int:
        """Query heads per layer of the model shape."""
        return self._size

