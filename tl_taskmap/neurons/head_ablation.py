"""Switching attention heads off: ``with ablate(model, heads): ...`` for a :class:`~tl_taskmap.neurons.sets.HeadSet`.

:func:`~tl_taskmap.neurons.ablation.ablate` hands head sets to :func:`ablate_heads`; the modes mirror
the neuron ones:

* ``mode="zero"``: a hook on each layer's ``attn.hook_z`` sets the heads' outputs (all ``d_head``
  features, at every position) to 0.
* ``mode="mean"``: the same hook sets them to their mean output (``[n_layers, n_heads, d_head]`` from
  :func:`head_mean_activations`).
* ``mode="params"``: the heads' rows of ``W_O`` are zeroed in place and written back bit for bit on exit.

``"zero"`` and ``"params"`` give the same logits: the attention output is ``Σ_h z_h W_O[h] + b_O``, so
zeroing ``z_h`` or ``W_O[h]`` removes the same term (``b_O`` is shared and stays). Under grouped-query
attention a head is a query head: its shared key/value head is untouched (see
:mod:`tl_taskmap.neurons.heads`).

Example:
    >>> from tl_taskmap.neurons.ablation import ablate
    >>> with ablate(model, HeadSet(30, 9, {3: [0, 4]}), mode="params"):   # doctest: +SKIP
    ...     logits = model("The movie was great")
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.models import ModelAdapter, as_adapter
from tl_taskmap.neurons.ablation_context import MODES, Ablation, AblationMode, check_mean_tensor, measure_means, zeroed_slices
from tl_taskmap.neurons.heads import HeadLayout, check_head_set, head_layout, head_output_weight, split_heads
from tl_taskmap.neurons.sets import HeadSet
from tl_taskmap.probes import MeanActivationProbe
from tl_taskmap.tasks import Task, TaskSuite

__all__ = ["HeadMeanActivationProbe", "ablate_heads", "check_head_means", "head_mean_activations"]


def check_head_means(model: Any, means: Any) -> Tensor:
    """Validate per-head mean outputs ``[n_layers, n_heads, d_head]`` for ``mode="mean"``; return them.

    Example:
        >>> check_head_means(model, head_mean_activations(model, prompts)).shape   # doctest: +SKIP
    """
    layout = head_layout(model)
    return check_mean_tensor(
        means, (layout.n_layers, layout.n_heads, layout.d_head), "n_layers, n_heads, d_head",
        missing=("mode='mean' needs mean_activations=[n_layers, n_heads, d_head] for a HeadSet; "
                 "measure them with head_mean_activations(model, reference_prompts)"),
        hint=" for a HeadSet (head_mean_activations measures them)")


@contextlib.contextmanager
def ablate_heads(
    model: Any,
    heads: HeadSet,
    mode: AblationMode = "zero",
    *,
    mean_activations: Optional[Float[Tensor, "n_layers n_heads d_head"]] = None,
) -> Iterator[Ablation]:
    """Switch ``heads`` off for the duration of a ``with`` block; the model is restored exactly on exit.

    Everything is validated before the model is touched; on exit (also on an exception or
    KeyboardInterrupt) the hooks are removed and zeroed ``W_O`` rows are written back bit for bit.
    An empty set is an exact no-op. :func:`~tl_taskmap.neurons.ablation.ablate` calls this for a HeadSet.

    Args:
        model: A HookedTransformer, TransformerBridge or ModelAdapter.
        heads: The (query) heads to switch off, built for this model's ``(n_layers, n_heads)``.
        mode: ``"zero"`` (outputs set to 0), ``"mean"`` (set to ``mean_activations``) or ``"params"``
            (the heads' ``W_O`` rows zeroed in place).
        mean_activations: ``[n_layers, n_heads, d_head]`` for ``mode="mean"``, from :func:`head_mean_activations`.

    Yields:
        An :class:`~tl_taskmap.neurons.ablation.Ablation` handle (its ``neurons`` field holds the HeadSet).

    Example:
        >>> with ablate_heads(model, HeadSet(30, 9, {3: [0]})) as handle:   # doctest: +SKIP
        ...     logits = handle.adapter.forward(batch)
    """
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}: use one of {MODES}")
    adapter = check_head_set(model, heads)
    layout = head_layout(adapter)
    means = check_head_means(adapter, mean_activations) if mode == "mean" else None
    if mode != "mean" and mean_activations is not None:
        raise ValueError(f"mean_activations is only used with mode='mean', not mode={mode!r}")
    if mode == "params":
        with _zeroed_output_rows(adapter, heads):
            yield Ablation(adapter, heads, mode, ())
        return
    masks = heads.to_mask()
    hooks = [(layout.hook_name(layer), _replace_heads_hook(masks[layer], None if means is None else means[layer], layout, layer))
             for layer in heads.layers()]
    with adapter.hooks(hooks):
        yield Ablation(adapter, heads, mode, tuple(name for name, _ in hooks))


def _replace_heads_hook(mask: Tensor, fill: Optional[Tensor], layout: HeadLayout, layer: int) -> Callable[..., Tensor]:
    """A hook replacing the masked heads' ``hook_z`` slices (out of place, so autograd stays valid)."""
    cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Optional[Tensor]]] = {}

    def hook(z: Tensor, hook: Any) -> Tensor:
        per_head = split_heads(z, layout.n_heads, layout.d_head)
        key = (z.device, z.dtype)
        if key not in cache:
            cache[key] = (mask.to(z.device)[:, None], None if fill is None else fill.to(z.device, z.dtype))
        on_device, value = cache[key]
        replaced = per_head.masked_fill(on_device, 0) if value is None else torch.where(on_device, value, per_head)
        return replaced.reshape(z.shape)

    return hook


@contextlib.contextmanager
def _zeroed_output_rows(adapter: ModelAdapter, heads: HeadSet) -> Iterator[None]:
    slices = []
    for layer in heads.layers():
        weight = head_output_weight(adapter, layer)
        slices.append((weight.param, weight.dim, weight.rows(heads.indices(layer)).to(weight.param.device)))
    with zeroed_slices(slices):
        yield


class HeadMeanActivationProbe(MeanActivationProbe):
    """Mean ``hook_z`` output of every head over all real prompt tokens (float64 sums), as a probe.

    ``result(model=None)`` is a float32 ``[n_layers, n_heads, d_head]`` tensor on the CPU, as
    ``ablate(model, heads, mode="mean", mean_activations=...)`` takes it.

    Example:
        >>> means = run_probes(model, prompts, [HeadMeanActivationProbe()])[0].result()   # doctest: +SKIP
    """

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        if self.model is not None and model != self.model:
            return []
        layout = head_layout(adapter)
        self.__dict__.setdefault("layout_", {})[model] = layout
        return [layout.hook_name(layer) for layer in range(layout.n_layers)]

    def _sum_over_tokens(self, model: str, x: Tensor, weights: Tensor) -> Tensor:
        layout = self.__dict__["layout_"][model]
        return super()._sum_over_tokens(model, split_heads(x, layout.n_heads, layout.d_head), weights)


def head_mean_activations(model: Any, prompts_or_task: Sequence[str] | Task | TaskSuite | Sequence[Task],
                          **options: Any) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Mean ``hook_z`` output of every head over all real tokens of a reference set (float64 sums).

    Every real (non-padding) token of every prompt counts once, BOS included; for tasks the prompts
    are used. Hooks already on the model apply; measure outside any ablation. Takes the keyword
    options of :func:`~tl_taskmap.neurons.ablation.mean_activations` (``batch_size=8``,
    ``prepend_bos=None``, ``progress=False``).

    Returns:
        float32 means on the CPU, ready for ``ablate(model, heads, mode="mean", mean_activations=...)``.

    Example:
        >>> means = head_mean_activations(model, reference_task)   # doctest: +SKIP
    """
    return measure_means(HeadMeanActivationProbe(), as_adapter(model), prompts_or_task, **options)
