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

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.evaluate import answer_batches, answer_nll
from tl_taskmap.models import PaddingSide, TokenBatch, as_adapter
from tl_taskmap.neurons.heads import head_layout, split_heads
from tl_taskmap.neurons.attribution import (
    AGGREGATES, POSITIONS, Aggregate, LossFn, Positions, RelevanceScores, _relevance_mode, position_mask,
)
from tl_taskmap.neurons.sets import HeadSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite

__all__ = ["GradXActHeadRelevance", "HeadRelevanceScores", "head_relevance", "head_relevance_by_task", "relevance_with_heads"]


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

    @classmethod
    def empty(cls, n_layers: int, n_heads: int, **kwargs: Any) -> "HeadRelevanceScores":
        """Zero scores for a model shape. Example: ``HeadRelevanceScores.empty(2, 4)``."""
        return cls(torch.zeros(n_layers, n_heads), torch.zeros(n_layers, n_heads), **kwargs)

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


class GradXActHeadRelevance:
    """Streaming grad × activation relevance at ``attn.hook_z`` of every layer (and, optionally, ``mlp.hook_post``).

    Configure in ``__init__``, feed with :meth:`add` (one batch) or :meth:`fit` (a whole task); the
    head scores are ``result_`` (:class:`HeadRelevanceScores`) and, with ``neurons=True``, the neuron
    scores of the same pass are ``neuron_result_`` (:class:`~tl_taskmap.neurons.attribution.RelevanceScores`).

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter.
        aggregate, positions, loss_fn, name: As in :class:`~tl_taskmap.neurons.attribution.GradXActRelevance`.
        neurons: Also score the MLP neurons in the same forward and backward.

    Example:
        >>> est = GradXActHeadRelevance(model, neurons=True).fit(task)   # doctest: +SKIP
        >>> est.result_.top(0.1), est.neuron_result_.top(0.1)            # doctest: +SKIP
    """

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

    def reset(self) -> "GradXActHeadRelevance":
        """Forget everything added so far."""
        a, lay = self.adapter, self.layout
        loss = "answer_nll(mean)" if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        common = {"backend": a.backend, "model": type(getattr(a.model, "original_model", a.model)).__name__, "n_layers": a.n_layers,
                  "loss": loss}
        options = dict(aggregate=self.aggregate, positions=self.positions, name=self.name)
        self.result_ = HeadRelevanceScores.empty(lay.n_layers, lay.n_heads, meta={
            **common, "site": "attn_z", "n_heads": lay.n_heads, "d_head": lay.d_head, "n_key_value_heads": lay.n_key_value_heads},
            **options)
        self.neuron_result_: Optional[RelevanceScores] = None
        if self.neurons:
            self.neuron_result_ = RelevanceScores.empty(a.n_layers, int(a.d_mlp), meta={
                **common, "site": "mlp_post", "d_mlp": a.d_mlp, "gated_mlp": a.gated_mlp}, **options)
        return self

    def _losses(self, logits: Tensor, batch: TokenBatch) -> Tensor:
        if self.loss_fn is None:
            n_answer = batch.target_mask.sum(1)
            if bool((n_answer == 0).any()):
                rows = torch.nonzero(n_answer == 0).flatten().tolist()
                raise ValueError(f"rows {rows[:5]} of the batch have no answer tokens, so the answer-token loss is undefined; "
                                 "give every prompt a target completion or pass loss_fn=")
            return answer_nll(logits, batch)
        losses = self.loss_fn(logits, batch)
        if not isinstance(losses, Tensor) or losses.shape != (len(batch),):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return one loss per example, shape ({len(batch)},), got {shape}")
        return losses

    def add(self, batch: TokenBatch) -> "GradXActHeadRelevance":
        """Add one batch: one forward and one backward for every layer's heads (and neurons).

        Example:
            >>> est.add(adapter.tokenize(prompts, answers))   # doctest: +SKIP
        """
        a, lay = self.adapter, self.layout
        batch = batch.to(a.device)
        mask = position_mask(batch, self.positions)
        acts: dict[tuple[str, int], Tensor] = {}

        def keep(kind: str, layer: int) -> Callable[..., Tensor]:
            def hook(act: Tensor, hook: Any) -> Tensor:
                if (kind, layer) in acts:
                    raise RuntimeError(f"{hook.name} fired twice in one forward pass; relevance needs it once per layer")
                if not act.requires_grad:  # parameters are frozen, so the first layer starts the graph here
                    act = act.detach().requires_grad_(True)
                acts[(kind, layer)] = act
                return act

            return hook

        hooks = [(name, keep("head", layer)) for layer, name in enumerate(self.hook_names)]
        if self.neurons:
            hooks += [(name, keep("neuron", layer)) for layer, name in enumerate(self.neuron_hook_names)]
        with _relevance_mode(a.model), a.hooks(hooks):
            logits = a.forward(batch)
            losses = self._losses(logits, batch)
            if not bool(torch.isfinite(losses).all()):
                rows = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
                raise ValueError(f"the loss is NaN or infinite for rows {rows[:5]} of the batch; relevance would be NaN")
            keys = [("head", layer) for layer in range(lay.n_layers)]
            keys += [("neuron", layer) for layer in range(a.n_layers)] if self.neurons else []
            missing = [f"{kind} hook of layer {layer}" for kind, layer in keys if (kind, layer) not in acts]
            if missing:
                raise RuntimeError(f"{missing[:3]} did not fire during the forward pass")
            grads = dict(zip(keys, torch.autograd.grad(losses.sum(), [acts[k] for k in keys], allow_unused=True)))
        weight = mask.to(torch.float32)
        head_abs, head_signed = torch.zeros_like(self.result_.sum_abs), torch.zeros_like(self.result_.signed_sum)
        neuron_sums = (torch.zeros_like(self.neuron_result_.sum_abs), torch.zeros_like(self.neuron_result_.signed_sum)) if self.neurons else None
        for (kind, layer), grad in grads.items():
            if grad is None:  # the layer does not reach the loss: zero relevance
                continue
            prod = grad.float() * acts[(kind, layer)].detach().float()  # layers may sit on other devices
            if kind == "head":  # one term per (example, position, head): the sum over the head's d_head features
                prod = split_heads(prod, lay.n_heads, lay.d_head).sum(-1)
                target = (head_abs, head_signed)
            else:
                target = neuron_sums
            prod = prod * weight.to(prod.device)[..., None]
            target[0][layer] = prod.abs().sum((0, 1), dtype=torch.float64).cpu()
            target[1][layer] = prod.sum((0, 1), dtype=torch.float64).cpu()
            if not bool(torch.isfinite(target[0][layer]).all()):
                raise ValueError(f"{kind} relevance is NaN or infinite in layer {layer}: activations or gradients overflowed (try float32)")
        counts = dict(n_examples=len(batch), n_tokens=int(mask.sum()), aggregate=self.aggregate, positions=self.positions)
        self.result_ = self.result_.merge(HeadRelevanceScores(head_abs, head_signed, name=self.result_.name, meta=self.result_.meta, **counts))
        if self.neurons:
            self.neuron_result_ = self.neuron_result_.merge(RelevanceScores(
                *neuron_sums, name=self.neuron_result_.name, meta=self.neuron_result_.meta, **counts))
        return self

    def fit(self, data: Union[Task, Iterable[TokenBatch]], *, batch_size: int = 8, padding_side: PaddingSide = "left",
            prepend_bos: Optional[bool] = None, progress: bool = False) -> "GradXActHeadRelevance":
        """Reset, then add every batch of a task (prompt + target) or of an iterable of TokenBatches.

        Example:
            >>> GradXActHeadRelevance(model).fit(task).result_   # doctest: +SKIP
        """
        self.reset()
        if isinstance(data, Task):
            if len(data) == 0:
                raise ValueError(f"task {data.name!r} has no examples: relevance needs at least one")
            if self.name is None:
                self.result_.name = data.name
                if self.neuron_result_ is not None:
                    self.neuron_result_.name = data.name
            batches: Iterable[TokenBatch] = answer_batches(self.adapter, data, batch_size, padding_side=padding_side, prepend_bos=prepend_bos)
            total = -(-len(data) // batch_size)
        else:
            batches, total = data, None
        for batch in tqdm(batches, total=total, disable=not progress, desc=f"head relevance {self.result_.name or ''}".strip()):
            try:
                self.add(batch)
            except ValueError as err:  # say which task the batch came from
                raise ValueError(f"task {data.name!r}: {err}" if isinstance(data, Task) else str(err)) from None
        if self.result_.n_examples == 0:
            raise ValueError("no examples were given: relevance needs at least one batch with one example")
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
