"""Gradient × activation relevance of every attention head, alone or together with the FFN neurons.

For query head ``h`` of layer ``l`` with output ``z`` at ``blocks.{l}.attn.hook_z`` (its ``d_head``
features before ``W_O``; see :mod:`tl_taskmap.neurons.heads`), example ``i`` and position ``t``, the
first-order Taylor estimate of the loss change from zeroing the head's output there is
``-Σ_d ∂L_i/∂z_{i,t,h,d} · z_{i,t,h,d}``. Scores aggregate the per-(example, position) terms
``Σ_d g·z`` exactly as neuron relevance aggregates ``g·a`` (:mod:`tl_taskmap.neurons.attribution`): the
same losses (mean answer NLL or ``loss_fn``), positions (``answer``/``prompt``/``all``/``last_prompt``),
aggregates (``sum_abs``: ``Σ_i Σ_t |Σ_d g·z|``; ``abs_sum``: ``|Σ_i Σ_t Σ_d g·z|``), float64 sums,
exact merges and safetensors files. A head is one unit, so the sum over ``d_head`` comes first: the
per-head estimate is what zeroing the whole head predicts, not a sum of per-feature magnitudes.

``GradXActHeadRelevance(model, neurons=True)`` keeps ``hook_z`` *and* ``mlp.hook_post`` of every layer
in the same forward and backward, so heads and neurons together cost one pass per batch (the
neuron scores equal :class:`~tl_taskmap.neurons.attribution.GradXActRelevance`'s).

Example:
    >>> from tl_taskmap.neurons.head_attribution import head_relevance, relevance_with_heads
    >>> heads = head_relevance(model, task).top(0.1)               # doctest: +SKIP
    >>> neuron_rel, head_rel = relevance_with_heads(model, task)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.models import ModelAdapter, PaddingSide, TokenBatch, as_adapter
from tl_taskmap.neurons.heads import HeadLayout, head_layout, split_heads
from tl_taskmap.neurons.attribution import (
    AGGREGATES, POSITIONS, Aggregate, DriverEstimator, LossFn, Positions, RelevanceProbe, RelevanceScores, relevance_meta,
)
from tl_taskmap.neurons.sets import HeadSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite

__all__ = ["GradXActHeadRelevance", "HeadRelevanceProbe", "HeadRelevanceScores", "head_relevance", "head_relevance_by_task", "relevance_with_heads"]


class HeadRelevanceScores(RelevanceScores):
    """Accumulated grad × act relevance of every attention head: ``[n_layers, n_heads]`` float64 sums.

    The same object as :class:`~tl_taskmap.neurons.attribution.RelevanceScores` (``scores``,
    ``mean_scores``, ``first_order_delta``, ``merge``, ``save``/``load``), over heads: ``top`` gives a
    :class:`~tl_taskmap.neurons.sets.HeadSet` and the meta records ``unit="head"``.

    Example:
        >>> rel = head_relevance(model, task)   # doctest: +SKIP
        >>> rel.scores.shape, rel.top(0.1)      # doctest: +SKIP
    """

    def __init__(self, sum_abs: Float[Tensor, "n_layers n_heads"], signed_sum: Float[Tensor, "n_layers n_heads"], **kwargs: Any):
        meta = dict(kwargs.pop("meta", None) or {})
        if meta.get("unit", "head") != "head":
            raise ValueError(f"these scores are over {meta['unit']}s, not heads: load them with RelevanceScores.load")
        super().__init__(sum_abs, signed_sum, meta={**meta, "unit": "head"}, **kwargs)

    @property
    def n_heads(self) -> int:
        return self.sum_abs.shape[1]

    def top(self, fraction: float, per_layer: bool = True) -> HeadSet:  # type: ignore[override]
        """The top ``fraction`` of heads by relevance (at least one per layer with ``per_layer``).

        Example:
            >>> rel.top(0.1).counts_per_layer()   # doctest: +SKIP
        """
        self._check_nonempty()
        meta = {"task": self.name, "relevance": {"aggregate": self.aggregate, "positions": self.positions,
                                                   "n_examples": self.n_examples, "n_tokens": self.n_tokens}}
        return HeadSet.top_k(self.scores, fraction, per_layer=per_layer, name=self.name, meta=meta)

    def merge(self, other: RelevanceScores) -> "HeadRelevanceScores":
        """Scores over both streams of data (exact). Also ``a + b``."""
        if not isinstance(other, HeadRelevanceScores):
            raise TypeError(f"can only merge head relevance with HeadRelevanceScores, got {type(other).__name__}")
        merged = super().merge(other)
        return HeadRelevanceScores(merged.sum_abs, merged.signed_sum, n_examples=merged.n_examples, n_tokens=merged.n_tokens,
                                   aggregate=merged.aggregate, positions=merged.positions, name=merged.name, meta=merged.meta)

    __add__ = merge

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per head: ``layer, head, score, first_order_delta``."""
        layer, head = np.meshgrid(np.arange(self.n_layers), np.arange(self.n_heads), indexing="ij")
        return pd.DataFrame({"layer": layer.reshape(-1), "head": head.reshape(-1), "score": self.scores.numpy().reshape(-1),
                             "first_order_delta": self.first_order_delta.numpy().reshape(-1)})

    def share_table(self) -> pd.DataFrame:
        """``layer × head`` table of each head's share of the total relevance (sums to 1).

        Example:
            >>> rel.share_table().round(3)   # doctest: +SKIP
        """
        scores = self.scores
        total = float(scores.sum())
        table = pd.DataFrame((scores / total if total > 0 else scores).numpy(), columns=range(self.n_heads))
        table.index.name, table.columns.name = "layer", "head"
        return table

    def __repr__(self) -> str:
        return super().__repr__().replace("RelevanceScores(", "HeadRelevanceScores(", 1).replace(f"d_mlp={self.n_heads}", f"n_heads={self.n_heads}")

    @classmethod
    def load(cls, path: Any) -> "HeadRelevanceScores":
        """Read head scores written by :meth:`save` (a neuron file is refused, naming the unit)."""
        loaded = RelevanceScores.load(path)
        if loaded.meta.get("unit") != "head":
            raise ValueError(f"{path} holds relevance of {loaded.meta.get('unit', 'neuron')}s, not heads: use RelevanceScores.load")
        return cls(loaded.sum_abs, loaded.signed_sum, n_examples=loaded.n_examples, n_tokens=loaded.n_tokens,
                   aggregate=loaded.aggregate, positions=loaded.positions, name=loaded.name, meta=loaded.meta)


def head_relevance_meta(adapter: ModelAdapter, layout: HeadLayout, loss: str) -> dict[str, Any]:
    """The provenance recorded with head relevance scores (site, backend, model class, sizes, loss)."""
    a = adapter
    return {"backend": a.backend, "model": type(getattr(a.model, "original_model", a.model)).__name__, "n_layers": a.n_layers,
            "loss": loss, "site": "attn_z", "n_heads": layout.n_heads, "d_head": layout.d_head,
            "n_key_value_heads": layout.n_key_value_heads}


class HeadRelevanceProbe(RelevanceProbe):
    """Grad × activation relevance of every attention head (at ``attn.hook_z``), as a probe.

    The parameters, loss and protocol of :class:`~tl_taskmap.neurons.attribution.RelevanceProbe`; the
    per-(example, position) term of a head is the sum over its ``d_head`` features of ``g·z``, and
    ``result(task=None, model=None)`` is a :class:`HeadRelevanceScores`. Fed to the driver together
    with a ``RelevanceProbe`` of the same loss, heads and neurons share one forward and one backward.

    Example:
        >>> heads, neurons = run_probes(model, task, [HeadRelevanceProbe(), RelevanceProbe()])   # doctest: +SKIP
        >>> heads.result().top(0.1)                                                               # doctest: +SKIP
    """

    scores_class = HeadRelevanceScores
    label = "head relevance"

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        if not self.uses(model):
            return []
        layout = head_layout(adapter)  # validates hook_z in every layer
        self.__dict__.setdefault("layout_", {})[model] = layout
        self.__dict__.setdefault("meta_", {})[model] = head_relevance_meta(adapter, layout, self.loss_name)
        return [layout.hook_name(layer) for layer in range(layout.n_layers)]

    def unit_terms(self, model: str, prod: Tensor) -> Tensor:
        """One term per head: the sum of ``g·z`` over the head's ``d_head`` features."""
        layout = self.__dict__["layout_"][model]
        return split_heads(prod, layout.n_heads, layout.d_head).sum(-1)


class GradXActHeadRelevance(DriverEstimator):
    """Streaming grad × activation relevance at ``attn.hook_z`` of every layer (and, optionally, ``mlp.hook_post``).

    Configure in ``__init__``, feed with :meth:`add` (one batch) or :meth:`fit` (a whole task); the
    head scores are ``result_`` (:class:`HeadRelevanceScores`) and, with ``neurons=True``, the neuron
    scores of the same pass are ``neuron_result_`` (:class:`~tl_taskmap.neurons.attribution.RelevanceScores`).
    A thin face over :class:`HeadRelevanceProbe` (and a ``RelevanceProbe``) fed by the driver.

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter.
        aggregate, positions, loss_fn, name: As in :class:`~tl_taskmap.neurons.attribution.GradXActRelevance`.
        neurons: Also score the MLP neurons in the same forward and backward.

    Example:
        >>> est = GradXActHeadRelevance(model, neurons=True).fit(task)   # doctest: +SKIP
        >>> est.result_.top(0.1), est.neuron_result_.top(0.1)            # doctest: +SKIP
    """

    _desc = "head relevance"

    def __init__(self, model: Any, *, aggregate: Aggregate = "sum_abs", positions: Positions = "answer",
                 loss_fn: Optional[LossFn] = None, name: Optional[str] = None, neurons: bool = False):
        for value, options, what in ((aggregate, AGGREGATES, "aggregate"), (positions, POSITIONS, "positions")):
            if value not in options:
                raise ValueError(f"{what} must be one of {tuple(options)}, got {value!r}")
        self.adapter = as_adapter(model)
        self.layout = head_layout(self.adapter)  # validates hook_z in every layer up front
        self.hook_names = [self.layout.hook_name(layer) for layer in range(self.layout.n_layers)]
        self.neurons = bool(neurons)
        if self.neurons:
            if self.adapter.d_mlp is None:
                raise ValueError("the model's cfg has no d_mlp: neurons=True needs MLP neurons (mlp.hook_post)")
            self.neuron_hook_names = [self.adapter.hook_name(layer, "mlp_post") for layer in range(self.adapter.n_layers)]
        self.aggregate, self.positions, self.loss_fn, self.name = aggregate, positions, loss_fn, name
        self.reset()

    def _probes(self) -> dict[str, RelevanceProbe]:
        options = (self.aggregate, self.positions, self.loss_fn)
        probes: dict[str, RelevanceProbe] = {"result_": HeadRelevanceProbe(*options)}
        if self.neurons:  # same loss, so the driver serves both from one backward
            probes["neuron_result_"] = RelevanceProbe(*options)
        return probes

    def reset(self) -> "GradXActHeadRelevance":
        """Forget everything added so far."""
        a, lay = self.adapter, self.layout
        probes = self._probes()
        loss = probes["result_"].loss_name
        options = dict(aggregate=self.aggregate, positions=self.positions, name=self.name)
        self.result_ = HeadRelevanceScores.empty(lay.n_layers, lay.n_heads, meta=head_relevance_meta(a, lay, loss), **options)
        self.neuron_result_: Optional[RelevanceScores] = None
        if self.neurons:
            self.neuron_result_ = RelevanceScores.empty(a.n_layers, int(a.d_mlp), meta=relevance_meta(a, loss), **options)
        return self


def head_relevance(model: Any, task: Union[Task, Iterable[TokenBatch]], *, aggregate: Aggregate = "sum_abs",
                   positions: Positions = "answer", loss_fn: Optional[LossFn] = None, batch_size: int = 8,
                   padding_side: PaddingSide = "left", prepend_bos: Optional[bool] = None, progress: bool = False) -> HeadRelevanceScores:
    """Grad × activation relevance of every attention head of ``model`` for ``task``.

    Example:
        >>> rel = head_relevance(model, task)   # doctest: +SKIP
        >>> rel.top(0.1)                         # doctest: +SKIP
        HeadSet(name='sst2', n_layers=30, n_heads=9, total=30 (11.1%), per_layer=[1, 1, 1, 1, 1, 1, 1, 1, ...])
    """
    est = GradXActHeadRelevance(model, aggregate=aggregate, positions=positions, loss_fn=loss_fn)
    est.fit(task, batch_size=batch_size, padding_side=padding_side, prepend_bos=prepend_bos, progress=progress)
    return est.result_


def relevance_with_heads(model: Any, task: Union[Task, Iterable[TokenBatch]], **kwargs: Any) -> tuple[RelevanceScores, HeadRelevanceScores]:
    """Neuron and head relevance from the same forward + backward passes: ``(neurons, heads)``.

    Takes :func:`head_relevance`'s keyword options.

    Example:
        >>> neuron_rel, head_rel = relevance_with_heads(model, task)   # doctest: +SKIP
    """
    fit_keys = ("batch_size", "padding_side", "prepend_bos", "progress")
    est = GradXActHeadRelevance(model, neurons=True, **{k: v for k, v in kwargs.items() if k not in fit_keys})
    est.fit(task, **{k: v for k, v in kwargs.items() if k in fit_keys})
    assert est.neuron_result_ is not None
    return est.neuron_result_, est.result_


def head_relevance_by_task(model: Any, tasks: Union[Task, Sequence[Task], Mapping[str, Task], TaskSuite], **kwargs: Any) -> dict[str, HeadRelevanceScores]:
    """:func:`head_relevance` for every task of a suite, keyed by task name.

    Example:
        >>> sets = {n: r.top(0.1) for n, r in head_relevance_by_task(model, suite).items()}   # doctest: +SKIP
    """
    return {task.name: head_relevance(model, task, **kwargs) for task in as_suite(tasks)}
