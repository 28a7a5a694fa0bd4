"""Per-layer cosine similarity of two tasks' neuron parameters within one model (Leng & Xiong 2024, §5.2).

Neuron ``j`` of layer ``l`` owns a parameter vector ``w_j``: its slices of ``W_in`` (and ``W_gate`` for
gated MLPs), ``b_in`` and ``W_out``, concatenated (see :meth:`ModelAdapter.neuron_params`). The
paper takes "the task-specific neuron parameters" ``P_A`` and ``P_B`` of two tasks in the same
model and reports ``cos(P_A, P_B)`` per layer, without saying how two sets of *different* neurons
become vectors of one space. Two readings are offered:

* ``method="masked"`` (default, the literal reading): ``P_A`` is the layer's neuron-parameter
  matrix with the rows of neurons outside ``A`` set to zero, flattened — the parameters that
  neuron-level fine-tuning of task A would update. Then
  ``cos = Σ_{j∈A∩B} |w_j|² / sqrt(Σ_{j∈A} |w_j|² · Σ_{j∈B} |w_j|²)``: a weight-norm-weighted overlap,
  1 for identical sets and 0 for disjoint ones.
* ``method="mean"``: ``P_A`` is the mean parameter vector of A's neurons, ``(1/|A|) Σ_{j∈A} w_j``;
  it compares what the two sets' neurons look like, so disjoint sets can still be similar.

A layer where either set has no neurons (or only all-zero ones) has no direction: its cosine is NaN.

Example:
    >>> from tl_taskmap.neurons.similarity import parameter_similarity
    >>> parameter_similarity(model, rel_a.top(0.1), rel_b.top(0.1))   # doctest: +SKIP
    [0.12, 0.18, 0.25]
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.models import ModelAdapter, as_adapter
from tl_taskmap.neurons.sets import NeuronSet

Method = Literal["masked", "mean"]
METHODS = ("masked", "mean")


def neuron_parameter_matrix(model: Any, layer: int, roles: Optional[Sequence[str]] = None) -> Float[Tensor, "d_mlp n_params"]:
    """Every neuron's parameter vector of ``layer`` as one row (float64), roles in the adapter's order.

    Example:
        >>> neuron_parameter_matrix(model, 0).shape    # doctest: +SKIP
        torch.Size([48, 97])                           # W_in (32) + W_gate (32) + W_out (32) + ...
    """
    adapter = as_adapter(model)
    params = adapter.neuron_params(layer)
    if roles is not None:
        available = [p.role for p in params]
        unknown = sorted(set(roles) - set(available))
        if unknown:
            raise ValueError(f"layer {layer} has no neuron parameter role(s) {unknown}; available: {available}")
        params = [p for p in params if p.role in roles]
    d_mlp = int(adapter.d_mlp)  # type: ignore[arg-type]
    everyone = torch.arange(d_mlp)
    return torch.cat([p.neuron_slice(everyone).reshape(d_mlp, -1).to("cpu", torch.float64) for p in params], dim=1)


def _set_gram(vectors: Float[Tensor, "d_mlp n_params"], masks: Float[Tensor, "n_sets d_mlp"], method: Method) -> Float[Tensor, "n_sets n_sets"]:
    # Both readings are inner products of one vector per set, so one Gram matrix gives every pair.
    if method == "masked":
        norms = (vectors * vectors).sum(1)
        return (masks * norms) @ masks.T
    counts = masks.sum(1, keepdim=True).clamp(min=1)
    means = (masks / counts) @ vectors
    return means @ means.T


def _cosines(gram: Tensor) -> Tensor:
    diag = gram.diagonal().clamp(min=0).sqrt()
    denom = diag[:, None] * diag[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.full_like(gram, math.nan))
    return cos.clamp(-1.0, 1.0)


def _check_inputs(adapter: ModelAdapter, sets: Mapping[str, NeuronSet], method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if adapter.d_mlp is None:
        raise ValueError("the model's cfg has no d_mlp: parameter similarity needs MLP neurons")
    for name, neurons in sets.items():
        if not isinstance(neurons, NeuronSet):
            raise TypeError(f"{name!r} is a {type(neurons).__name__}, expected a NeuronSet")
        neurons.check_compatible(adapter.n_layers, adapter.d_mlp)


def parameter_similarity_matrix(
    model: Any, sets: Mapping[str, NeuronSet], *, method: Method = "masked", roles: Optional[Sequence[str]] = None
) -> pd.DataFrame:
    """Per-layer cosine similarity of the neuron parameters of every ordered pair of named sets.

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter whose parameters are compared.
        sets: Task name → NeuronSet (e.g. ``rel.top(0.1)`` per task).
        method: ``"masked"`` (default) or ``"mean"``; see the module docstring.
        roles: Parameter roles to include (``"W_in"``, ``"W_gate"``, ``"b_in"``, ``"W_out"``); default all.

    Returns:
        Long DataFrame ``task_a, task_b, layer, cosine`` over all ordered pairs (diagonal included:
        1.0 wherever the set is non-empty), so ``df.pivot_table(index="task_a", columns="task_b",
        values="cosine")`` gives the layer-averaged matrix.

    Example:
        >>> df = parameter_similarity_matrix(model, {"sst2": a, "qqp": b})   # doctest: +SKIP
        >>> df[df.task_a != df.task_b].groupby("layer").cosine.mean()       # doctest: +SKIP
    """
    adapter = as_adapter(model)
    _check_inputs(adapter, sets, method)
    names = list(sets)
    if not names:
        raise ValueError("parameter_similarity_matrix needs at least one neuron set")
    masks = torch.stack([sets[n].to_mask() for n in names]).to(torch.float64)  # [n_sets, n_layers, d_mlp]
    rows = []
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            cos = _cosines(_set_gram(neuron_parameter_matrix(adapter, layer, roles), masks[:, layer], method))
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    rows.append({"task_a": a, "task_b": b, "layer": layer, "cosine": float(cos[i, j])})
    return pd.DataFrame(rows, columns=["task_a", "task_b", "layer", "cosine"])


def parameter_similarity(
    model: Any, set_a: NeuronSet, set_b: NeuronSet, *, method: Method = "masked", roles: Optional[Sequence[str]] = None
) -> list[float]:
    """Cosine similarity of two neuron sets' parameters in each layer (NaN where a set is empty).

    Example:
        >>> parameter_similarity(model, neurons, neurons)    # doctest: +SKIP
        [1.0, 1.0, 1.0]
    """
    df = parameter_similarity_matrix(model, {"a": set_a, "b": set_b}, method=method, roles=roles)
    pair = df[(df.task_a == "a") & (df.task_b == "b")].sort_values("layer")
    return pair["cosine"].tolist()
