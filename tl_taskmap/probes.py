"""The probe protocol: configure, feed batches, merge, save, read the result.

A *probe* is anything that learns from activations at hook points, batch by batch, the way a
scikit-learn estimator learns from data:

* ``__init__`` stores parameters only (readable as data: :meth:`Probe.get_params`, ``repr``);
* :meth:`Probe.hook_names` declares the hook points it needs on each model, and the class attributes
  ``needs_grad`` / ``needs_logits`` / ``needs_targets`` whether it needs gradients at them, the
  logits, or the target completion appended to each prompt;
* :meth:`Probe.update` takes one :class:`ProbeBatch` (every model's activations at the declared
  hook points, gradients when asked for, and the token / attention / target masks);
* :meth:`Probe.merge`, :meth:`Probe.state_dict` / :meth:`Probe.load_state_dict` (+ ``save`` / ``load``
  through :mod:`tl_taskmap.state_io`) make it distributable and savable;
* :meth:`Probe.result` returns the result as data.

The driver (:mod:`tl_taskmap.driver`) runs the models, one forward per model per batch (and one
backward when some probe needs gradients), and feeds every probe. A probe never runs a model.

A user probe in a few lines (per-layer mean activation norm)::

    class MeanNorm(Probe):
        def __init__(self, site="resid_post"):
            self.site = site
            self.total_, self.n_ = {}, 0

        def hook_names(self, model, adapter):
            return [s.hook_name for s in resolve_sites(adapter, self.site)]

        def update(self, batch):
            for model, acts in batch.acts.items():
                for name, x in acts.items():
                    norms = batch.reduce(x, "last").double().norm(dim=-1)
                    self.total_[name] = self.total_.get(name, 0.0) + float(norms.sum())
            self.n_ += len(batch.tokens)

        def result(self):
            return {name: total / self.n_ for name, total in self.total_.items()}

Example:
    >>> from tl_taskmap.driver import run_probes
    >>> acts, means = run_probes(model, task, [ActivationProbe("resid_post"), MeanActivationProbe()])  # doctest: +SKIP
    >>> acts.result()["resid_post", -1].shape                                                         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_taskmap.memory import compact
from tl_taskmap.models import ModelAdapter, TokenBatch
from tl_taskmap.sinks import Activations
from tl_taskmap.sites import Site, SiteSpec, resolve_sites
from tl_taskmap.state_io import load_state_file, save_state_file

Reduction = Union[str, int, Callable[[Tensor, TokenBatch], Tensor]]

__all__ = ["Probe", "ProbeBatch", "ActivationProbe", "MeanActivationProbe", "SiteProbe", "reduce_prompt", "check_reduce",
           "keyed_state", "unkeyed_state"]


# ---------------------------------------------------------------------------- reductions
def check_reduce(reduce: Reduction) -> Reduction:
    """Fail early on an unknown reduction. Example: ``check_reduce("last")`` → ``'last'``."""
    if not (callable(reduce) or reduce in ("last", "mean") or (isinstance(reduce, int) and not isinstance(reduce, bool))):
        raise ValueError(f"unknown reduce {reduce!r}: use 'last', 'mean', an int position, or a callable(acts, batch)")
    return reduce


def prompt_view(batch: TokenBatch) -> TokenBatch:
    """The batch with only prompt tokens marked real (the target completion, if any, masked out)."""
    if not bool(batch.target_mask.any()):
        return batch
    mask = batch.attention_mask * (~batch.target_mask.bool()).to(batch.attention_mask.dtype)
    return TokenBatch(batch.tokens, mask, torch.zeros_like(batch.target_mask), batch.padding_side)


def reduce_prompt(acts: Float[Tensor, "batch pos d"], batch: TokenBatch, reduce: Reduction) -> Float[Tensor, "batch d"]:
    """One vector per example over its *prompt* tokens (padding and target tokens never count).

    ``"last"`` prompt token, ``"mean"`` over prompt tokens, an int position among them (``0`` first,
    ``-1`` last) or a callable ``(acts, batch) -> [batch, d]`` (given the batch with only prompt tokens
    marked real). With causal attention a prompt token's activation does not depend on what follows,
    so this equals the reduction of a prompt-only batch.

    Example:
        >>> b = TokenBatch(torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]]), torch.tensor([[False, False, False, True]]), "left")
        >>> reduce_prompt(torch.arange(4.).reshape(1, 4, 1), b, "last").tolist()
        [[2.0]]
    """
    view = prompt_view(batch)
    if callable(reduce):
        return reduce(acts, view)
    mask = view.attention_mask.to(acts.device)
    rows = torch.arange(acts.shape[0], device=acts.device)
    if reduce == "last":
        if view is batch and batch.padding_side == "left":
            return acts[:, -1]
        pos = torch.arange(mask.shape[1], device=acts.device)
        return acts[rows, (pos * mask.long()).argmax(-1)]
    if reduce == "mean":
        weights = mask.to(acts.dtype).unsqueeze(-1)
        return (acts * weights).sum(1) / weights.sum(1).clamp(min=1)
    if isinstance(reduce, int):
        lengths = mask.sum(1)
        first = mask.long().argmax(-1)  # first real prompt token, whichever side the padding is on
        offset = torch.full_like(lengths, reduce) if reduce >= 0 else lengths + reduce
        if bool(((offset < 0) | (offset >= lengths)).any()):
            raise ValueError(f"position {reduce} is outside some prompts (shortest has {int(lengths.min())} tokens)")
        return acts[rows, first + offset]
    raise ValueError(f"unknown reduce {reduce!r}: use 'last', 'mean', an int position, or a callable(acts, batch)")


# ---------------------------------------------------------------------------- the batch a probe sees
@dataclass
class ProbeBatch:
    """What one driver step hands every probe.

    Attributes:
        task: The task's name. cluster: its cluster. start: index of the batch's first example in the task.
        tokens: The tokenized batch (token ids, ``attention_mask``, ``target_mask``, padding side).
        acts: ``{model name: {hook name: [batch, pos, d]}}`` at the hook points the probe declared (detached).
        grads: ``{model name: {hook name: [batch, pos, d]}}`` gradients of the probe's loss (``needs_grad``).
        logits: ``{model name: [batch, pos, d_vocab]}`` when some probe ``needs_logits`` (detached).
        losses: ``{model name: [batch]}`` the probe's per-example loss (``needs_grad``).
    """

    task: str
    start: int
    tokens: TokenBatch
    acts: dict[str, dict[str, Tensor]]
    grads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    logits: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    cluster: str = "misc"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def prompt_mask(self) -> Bool[Tensor, "batch pos"]:
        """True at real prompt tokens (not padding, not the target)."""
        return prompt_view(self.tokens).attention_mask.bool()

    def reduce(self, acts: Float[Tensor, "batch pos d"], how: Reduction = "last") -> Float[Tensor, "batch d"]:
        """:func:`reduce_prompt` with this batch's masks."""
        return reduce_prompt(acts, self.tokens, how)


# ---------------------------------------------------------------------------- the protocol
class Probe:
    """Base class of probes; see the module docstring for the protocol.

    Subclasses set ``needs_grad`` / ``needs_logits`` / ``needs_targets`` and implement ``hook_names``,
    ``update`` and ``result``; ``merge`` / ``state_dict`` / ``load_state_dict`` make them mergeable and
    savable. A probe that needs gradients also defines ``loss(logits, tokens) -> [batch]`` and
    ``loss_key`` (probes sharing a key share one backward pass).
    """

    needs_grad: bool = False
    needs_logits: bool = False
    needs_targets: bool = False

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        """Hook names this probe needs on the model called ``model`` (``[]``: not this model)."""
        return []

    def uses(self, model: str) -> bool:
        """Whether this probe looks at the model called ``model`` (default: its ``model`` parameter, None = all)."""
        return getattr(self, "model", None) in (None, model)

    def update(self, batch: ProbeBatch) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement update(batch)")

    def result(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement result()")

    def merge(self, other: "Probe") -> "Probe":
        raise NotImplementedError(f"{type(self).__name__} is not mergeable (implement merge(other))")

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no state_dict(); implement it to save or distribute it")

    def load_state_dict(self, state: dict[str, Any]) -> "Probe":
        raise NotImplementedError(f"{type(self).__name__} has no load_state_dict()")

    # -- provided
    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` parameters, as stored (sklearn's ``get_params``)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _check_same_kind(self, other: Any) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(self).__name__} with a {type(other).__name__}")
        if _plain(self.get_params()) != _plain(other.get_params()):
            raise ValueError(f"cannot merge {self!r} with {other!r}: their parameters differ")

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``state_dict()`` to a ``.safetensors`` file (atomic, versioned; no pickle)."""
        save_state_file(path, type(self).__name__, self.state_dict())

    def load(self, path: Union[str, os.PathLike]) -> "Probe":
        """Replace this probe's state with one saved by :meth:`save` (same class). Returns ``self``."""
        _, state = load_state_file(path, type(self).__name__)
        return self.load_state_dict(state)

    def empty_copy(self) -> "Probe":
        """A probe with the same parameters and no data."""
        return type(self)(**copy.deepcopy(self.get_params()))


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (getattr(v, "__qualname__", repr(v)) if callable(v) else v) for k, v in params.items()}


def keyed_state(entries: dict[tuple, dict[str, Tensor]]) -> dict[str, Any]:
    """Flatten ``{key tuple: {field: tensor}}`` into a state (keys as JSON, tensors as ``"i.field"``)."""
    state: dict[str, Any] = {"keys": [list(k) for k in entries]}
    for i, fields in enumerate(entries.values()):
        state.update({f"{i}.{name}": t for name, t in fields.items()})
    return state


def unkeyed_state(state: dict[str, Any]) -> dict[tuple, dict[str, Tensor]]:
    """The inverse of :func:`keyed_state`."""
    out: dict[tuple, dict[str, Tensor]] = {tuple(k): {} for k in state.get("keys", [])}
    keys = list(out)
    for name, value in state.items():
        head, _, rest = name.partition(".")
        if head.isdigit() and rest:
            out[keys[int(head)]][rest] = value
    return out


def add_sum(sums: dict[Any, Tensor], counts: dict[Any, int], key: Any, total: Tensor, n: int) -> None:
    """Add ``total`` (a sum over ``n`` items) to a keyed running sum and its count (in place)."""
    sums[key] = sums[key] + total if key in sums else total
    counts[key] = counts.get(key, 0) + n


def merge_sums(sums: dict[Any, Tensor], counts: dict[Any, int], other_sums: dict[Any, Tensor], other_counts: dict[Any, int]) -> None:
    """Merge another probe's keyed running sums and counts into these (in place; new keys are copied)."""
    for key, total in other_sums.items():
        add_sum(sums, counts, key, total if key in sums else total.clone(), other_counts[key])


class SiteProbe(Probe):
    """A probe over fixed sites of every model (or one ``model``), reduced per example."""

    sites: SiteSpec
    model: Optional[str]

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        if self.model is not None and model != self.model:
            return []
        cache = self.__dict__.setdefault("_sites_by_model", {})
        if (model, id(adapter)) not in cache:
            cache[(model, id(adapter))] = resolve_sites(adapter, self.sites)
        sites = cache[(model, id(adapter))]
        self.__dict__.setdefault("site_of_", {}).update({s.hook_name: s for s in sites})
        return [s.hook_name for s in sites]

    def _site(self, hook_name: str) -> Site:
        return self.__dict__.get("site_of_", {}).get(hook_name) or Site(-1, "hook", hook_name)


# ---------------------------------------------------------------------------- capture as a probe
class ActivationProbe(SiteProbe):
    """Capture: one reduced vector per example at each site, kept in memory (float32, CPU).

    Args:
        sites: ``"resid_post"`` (every layer), ``("resid_post", 3)``, ``(3, "mlp_post")``, hook names, a list.
        reduce: ``"last"`` prompt token, ``"mean"`` over prompt tokens, an int position, or a callable.
        model: Only this model (default: every model the driver runs).

    ``result(task=None, model=None)`` is an :class:`~tl_taskmap.sinks.Activations` (examples in order).

    Example:
        >>> probe = run_probes(model, task, [ActivationProbe(["resid_post", "mlp_post"])])[0]   # doctest: +SKIP
        >>> probe.result()["resid_post", -1].shape                                              # doctest: +SKIP
    """

    def __init__(self, sites: SiteSpec = "resid_post", reduce: Reduction = "last", model: Optional[str] = None):
        self.sites, self.reduce, self.model = sites, check_reduce(reduce), model
        self.chunks_: dict[tuple[str, str], list[tuple[int, dict[str, Tensor]]]] = {}

    def update(self, batch: ProbeBatch) -> None:
        for model, acts in batch.acts.items():
            if self.model is not None and model != self.model:
                continue
            reduced = {}
            for name, x in acts.items():
                value = batch.reduce(x, self.reduce)
                if not bool(torch.isfinite(value).all()):
                    site = self._site(name)
                    raise FloatingPointError(f"non-finite (NaN/inf) activations at layer {site.layer} ({name}) of model {model!r}; "
                                             "check the model's weights and dtype (float16 overflows above 65504)")
                reduced[name] = compact(value.detach().to("cpu", torch.float32))  # not a view that keeps every position alive
            self.chunks_.setdefault((batch.task, model), []).append((batch.start, reduced))

    def _key(self, task: Optional[str], model: Optional[str]) -> tuple[str, str]:
        keys = [k for k in self.chunks_ if (task is None or k[0] == task) and (model is None or k[1] == model)]
        if len(keys) != 1:
            raise KeyError(f"{len(keys)} (task, model) results match task={task!r}, model={model!r}; "
                           f"have {sorted(self.chunks_)}: name the task and/or model")
        return keys[0]

    def result(self, task: Optional[str] = None, model: Optional[str] = None) -> Activations:
        chunks = sorted(self.chunks_[self._key(task, model)], key=lambda c: c[0])
        names = list(chunks[0][1])
        return Activations({self._site(n): torch.cat([c[1][n] for c in chunks]) for n in names})

    def merge(self, other: "ActivationProbe") -> "ActivationProbe":
        self._check_same_kind(other)
        for key, chunks in other.chunks_.items():
            self.chunks_.setdefault(key, []).extend(chunks)
        self.__dict__.setdefault("site_of_", {}).update(other.__dict__.get("site_of_", {}))
        return self

    def state_dict(self) -> dict[str, Any]:
        entries = {(task, model, start): reduced for (task, model), chunks in self.chunks_.items() for start, reduced in chunks}
        sites = [[s.layer, s.kind, s.hook_name] for s in self.__dict__.get("site_of_", {}).values()]
        return {**keyed_state(entries), "sites": sites}

    def load_state_dict(self, state: dict[str, Any]) -> "ActivationProbe":
        self.chunks_ = {}
        for (task, model, start), reduced in unkeyed_state(state).items():
            self.chunks_.setdefault((task, model), []).append((int(start), reduced))
        self.site_of_ = {c: Site(int(a), b, c) for a, b, c in state.get("sites", [])}
        return self


class MeanActivationProbe(Probe):
    """Mean ``mlp.hook_post`` activation of every neuron over all real prompt tokens (float64 sums).

    ``result(model=None)`` is a float32 ``[n_layers, d_mlp]`` tensor on the CPU, as
    ``ablate(..., mode="mean", mean_activations=...)`` takes it.

    Example:
        >>> means = run_probes(model, prompts, [MeanActivationProbe()])[0].result()   # doctest: +SKIP
    """

    def __init__(self, model: Optional[str] = None):
        self.model = model
        self.sums_: dict[str, Tensor] = {}
        self.n_tokens_: dict[str, int] = {}

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        if self.model is not None and model != self.model:
            return []
        return [adapter.hook_name(layer, "mlp_post") for layer in range(adapter.n_layers)]

    def update(self, batch: ProbeBatch) -> None:
        for model, acts in batch.acts.items():
            if self.model is not None and model != self.model:
                continue
            weights = batch.prompt_mask.to(torch.float64)
            sums = torch.stack([self._sum_over_tokens(model, x, weights) for x in acts.values()])
            add_sum(self.sums_, self.n_tokens_, model, sums, int(weights.sum()))

    def _sum_over_tokens(self, model: str, x: Tensor, weights: Tensor) -> Tensor:
        """``Σ_{b,t} w[b,t] · x[b,t]`` in float64 on the CPU: one layer's ``[batch, pos, ...]`` activations."""
        w = weights.to(x.device).reshape(*weights.shape, *[1] * (x.ndim - 2))
        return (x.double() * w).sum((0, 1)).cpu()

    def result(self, model: Optional[str] = None) -> Float[Tensor, "n_layers d_mlp"]:
        if model is None:
            if len(self.sums_) != 1:
                raise KeyError(f"mean activations of {sorted(self.sums_)}: name the model")
            model = next(iter(self.sums_))
        return (self.sums_[model] / self.n_tokens_[model]).float()

    def merge(self, other: "MeanActivationProbe") -> "MeanActivationProbe":
        self._check_same_kind(other)
        merge_sums(self.sums_, self.n_tokens_, other.sums_, other.n_tokens_)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {**keyed_state({(m,): {"sums": s} for m, s in self.sums_.items()}), "n_tokens": self.n_tokens_}

    def load_state_dict(self, state: dict[str, Any]) -> "MeanActivationProbe":
        self.sums_ = {k[0]: v["sums"] for k, v in unkeyed_state(state).items()}
        self.n_tokens_ = dict(state["n_tokens"])
        return self


def probes_by_model(probes: Sequence[Probe], model: str, adapter: ModelAdapter) -> dict[int, list[str]]:
    """``{index of probe: its hook names on this model}`` for the probes that use the model."""
    out = {}
    for i, probe in enumerate(probes):
        names = probe.hook_names(model, adapter)
        if names or ((probe.needs_logits or probe.needs_grad) and probe.uses(model)):
            out[i] = list(names)
    return out
