"""Gradient × activation relevance of every FFN neuron for a task (Leng & Xiong 2024, Eq. 2-3).

For neuron ``j`` of layer ``l`` with activation ``a`` at ``blocks.{l}.mlp.hook_post`` (the MLP hidden
unit, the input of the output projection), example ``i`` and token position ``t``, the first-order
Taylor estimate of the loss change from zeroing it is ``-∂L_i/∂a_{i,t,j} · a_{i,t,j}``. The scores
aggregate these terms over examples and the counted positions:

* ``aggregate="sum_abs"`` (default): ``R_j^l = Σ_i Σ_t |g·a|`` — every token's effect counts,
  whichever its sign (the paper's ``|ΔL|`` taken per example and token).
* ``aggregate="abs_sum"``: ``R_j^l = |Σ_i Σ_t g·a|`` — the size of the first-order change of the
  summed loss when the neuron is zeroed at all counted positions (signs can cancel).

Positions (``positions=``; padding never counts): ``"answer"`` (default: the positions whose logits
predict an answer token, i.e. where the loss is taken), ``"prompt"`` (real prompt tokens), ``"all"``
(every real token) or ``"last_prompt"`` (the last prompt token only).

The loss ``L_i`` is the task's own per-example loss: the mean NLL of the answer tokens given the
prompt (:func:`tl_taskmap.evaluate.answer_nll`), or ``loss_fn(logits, batch) -> [batch]``. Scores are
sums, not normalised by the number of examples or tokens: the ranking (and hence ``top``) does not
depend on it and merging stays exact; ``mean_scores`` divides by the counted tokens.

One forward and one backward per batch serve all layers: forward hooks keep every layer's
``hook_post`` tensor and ``torch.autograd.grad`` differentiates the summed per-example loss with
respect to them. Examples in a batch do not interact, so the gradient of the sum at example ``i`` is
``∂L_i/∂a_i``. Parameters are frozen during the pass (no parameter-gradient work; ``.grad`` is never
touched) and the model runs in eval mode; flags, modes and hooks are restored afterwards.

Example:
    >>> from tl_taskmap.neurons.attribution import relevance
    >>> rel = relevance(model, task)            # doctest: +SKIP
    >>> neurons = rel.top(0.10)                 # doctest: +SKIP
    >>> rel.save("sst2_relevance.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.driver import Driver, gradient_mode
from tl_taskmap.neurons.answer_loss import answer_nll_at_answers, answer_nll_from_rows, answer_predicting_positions  # noqa: F401
from tl_taskmap.models import ModelAdapter, PaddingSide, TokenBatch, as_adapter
from tl_taskmap.probes import Probe, ProbeBatch, keyed_state, unkeyed_state
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite
from tl_taskmap.state_io import FORMAT_VERSIONS

FORMAT_VERSION = FORMAT_VERSIONS["relevance"]
_META_KEY = "tl_taskmap.RelevanceScores"
Aggregate = Literal["sum_abs", "abs_sum"]
Positions = Literal["answer", "prompt", "all", "last_prompt"]
LossFn = Callable[[Tensor, TokenBatch], Tensor]
AGGREGATES = ("sum_abs", "abs_sum")
POSITIONS = ("answer", "prompt", "all", "last_prompt")


def position_mask(batch: TokenBatch, positions: Positions = "answer") -> Bool[Tensor, "batch pos"]:
    """Which token positions count towards relevance (padding never does).

    Example:
        >>> from tl_taskmap.models import TokenBatch
        >>> b = TokenBatch(torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]]),
        ...                torch.tensor([[False, False, False, True]]), "left")
        >>> position_mask(b, "answer").tolist(), position_mask(b, "prompt").tolist()
        ([[False, False, True, False]], [[False, True, True, False]])
    """
    real = batch.attention_mask.bool()
    target = batch.target_mask.bool() & real
    if positions == "all":
        return real
    if positions == "prompt":
        return real & ~target
    if positions == "answer":
        # The logits at t predict token t + 1, so the loss is taken where the *next* token is a target.
        mask = torch.zeros_like(real)
        mask[:, :-1] = target[:, 1:]
        return mask & real
    if positions == "last_prompt":
        prompt = real & ~target
        pos = torch.arange(real.shape[1], device=real.device)
        last = (pos * prompt.long()).argmax(-1)
        mask = torch.zeros_like(real)
        mask[torch.arange(real.shape[0], device=real.device), last] = True
        return mask & prompt
    raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def _check_choice(value: str, options: Sequence[str], what: str) -> None:
    if value not in options:
        raise ValueError(f"{what} must be one of {tuple(options)}, got {value!r}")


class RelevanceScores:
    """Accumulated grad × act relevance of every neuron: mergeable, savable, selectable.

    Attributes:
        sum_abs: ``Σ |g·a|`` over examples and counted positions, float64 ``[n_layers, d_mlp]``.
        signed_sum: ``Σ g·a`` (signed), float64 ``[n_layers, d_mlp]``.
        n_examples: Examples added. n_tokens: Counted positions added.
        aggregate, positions: The options used (see the module docstring).
        name: Usually the task name. meta: JSON-able provenance (model, loss, site).

    Example:
        >>> rel = relevance(model, task)     # doctest: +SKIP
        >>> rel.scores.shape, rel.top(0.1)   # doctest: +SKIP
    """

    def __init__(
        self,
        sum_abs: Float[Tensor, "n_layers d_mlp"],
        signed_sum: Float[Tensor, "n_layers d_mlp"],
        *,
        n_examples: int = 0,
        n_tokens: int = 0,
        aggregate: Aggregate = "sum_abs",
        positions: Positions = "answer",
        name: Optional[str] = None,
        meta: Optional[Mapping[str, Any]] = None,
    ):
        _check_choice(aggregate, AGGREGATES, "aggregate")
        _check_choice(positions, POSITIONS, "positions")
        self.sum_abs = torch.as_tensor(sum_abs).detach().to("cpu", torch.float64)
        self.signed_sum = torch.as_tensor(signed_sum).detach().to("cpu", torch.float64)
        if self.sum_abs.ndim != 2 or self.sum_abs.shape != self.signed_sum.shape:
            raise ValueError(f"sum_abs and signed_sum must both be [n_layers, d_mlp], got {tuple(self.sum_abs.shape)} and {tuple(self.signed_sum.shape)}")
        self.n_examples, self.n_tokens = int(n_examples), int(n_tokens)
        self.aggregate, self.positions, self.name = aggregate, positions, name
        self.meta: dict[str, Any] = json.loads(json.dumps(dict(meta or {})))

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, **kwargs: Any) -> "RelevanceScores":
        """Zero scores for a model shape (the start of a stream). Example: ``RelevanceScores.empty(2, 8)``.

        Subclasses inherit it over their units: ``HeadRelevanceScores.empty(n_layers, n_heads)``."""
        return cls(torch.zeros(n_layers, d_mlp), torch.zeros(n_layers, d_mlp), **kwargs)

    @property
    def n_layers(self) -> int:
        return self.sum_abs.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.sum_abs.shape[1]

    @property
    def scores(self) -> Float[Tensor, "n_layers d_mlp"]:
        """The relevance ``R_j^l`` under ``aggregate`` (float64, unnormalised sums)."""
        return self.sum_abs.clone() if self.aggregate == "sum_abs" else self.signed_sum.abs()

    @property
    def mean_scores(self) -> Float[Tensor, "n_layers d_mlp"]:
        """``scores`` per counted token, for comparing magnitudes across tasks of different sizes."""
        return self.scores / max(self.n_tokens, 1)

    @property
    def first_order_delta(self) -> Float[Tensor, "n_layers d_mlp"]:
        """First-order estimate of the change in the summed loss from zeroing each neuron at the counted positions."""
        return -self.signed_sum

    def _check_nonempty(self) -> None:
        if self.n_examples == 0:
            raise ValueError(f"relevance {self.name!r} has no examples yet: add batches (or fit a task) first")

    def top(self, fraction: float, per_layer: bool = True) -> NeuronSet:
        """The top ``fraction`` of neurons by relevance (the paper's k = 10% is ``0.10``).

        The set is named after the task; its meta records the selection (fraction, k, per_layer) and
        the relevance options.

        Example:
            >>> rel.top(0.10).counts_per_layer()   # doctest: +SKIP
            [5, 5, 5]
        """
        self._check_nonempty()
        meta = {"task": self.name, "relevance": {"aggregate": self.aggregate, "positions": self.positions,
                                                   "n_examples": self.n_examples, "n_tokens": self.n_tokens}}
        return NeuronSet.top_k(self.scores, fraction, per_layer=per_layer, name=self.name, meta=meta)

    def merge(self, other: "RelevanceScores") -> "RelevanceScores":
        """Scores over both streams of data (exact: the state is sums). Also ``a + b``.

        Example:
            >>> (first_half.merge(second_half).scores == whole.scores).all()   # doctest: +SKIP
        """
        if not isinstance(other, RelevanceScores):
            raise TypeError(f"can only merge RelevanceScores, got {type(other).__name__}")
        if other.sum_abs.shape != self.sum_abs.shape:
            raise ValueError(f"cannot merge relevance of shape {tuple(self.sum_abs.shape)} with {tuple(other.sum_abs.shape)}")
        for attr in ("aggregate", "positions"):
            if getattr(self, attr) != getattr(other, attr):
                raise ValueError(f"cannot merge relevance with {attr}={getattr(self, attr)!r} and {getattr(other, attr)!r}")
        if self.meta.get("loss") != other.meta.get("loss"):
            raise ValueError(f"cannot merge relevance of different losses: {self.meta.get('loss')!r} vs {other.meta.get('loss')!r}")
        name = self.name if self.name == other.name or other.name is None else (other.name if self.name is None else f"{self.name}+{other.name}")
        return RelevanceScores(
            self.sum_abs + other.sum_abs, self.signed_sum + other.signed_sum, n_examples=self.n_examples + other.n_examples,
            n_tokens=self.n_tokens + other.n_tokens, aggregate=self.aggregate, positions=self.positions, name=name, meta=self.meta,
        )

    __add__ = merge

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per neuron: ``layer, neuron, score, first_order_delta``."""
        layer, neuron = np.meshgrid(np.arange(self.n_layers), np.arange(self.d_mlp), indexing="ij")
        return pd.DataFrame({"layer": layer.reshape(-1), "neuron": neuron.reshape(-1), "score": self.scores.numpy().reshape(-1),
                             "first_order_delta": self.first_order_delta.numpy().reshape(-1)})

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import relevance_html

        return relevance_html(self)

    def __repr__(self) -> str:
        totals = self.scores.sum(1)
        share = (totals / totals.sum()).tolist() if float(totals.sum()) > 0 else [0.0] * self.n_layers
        shown = ", ".join(f"{s:.2f}" for s in share[:8]) + (", ..." if len(share) > 8 else "")
        return (f"RelevanceScores({self.name!r}, n_layers={self.n_layers}, d_mlp={self.d_mlp}, aggregate={self.aggregate!r}, "
                f"positions={self.positions!r}, n_examples={self.n_examples}, n_tokens={self.n_tokens}, layer_share=[{shown}])")

    def _header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "name": self.name, "aggregate": self.aggregate, "positions": self.positions,
                "n_examples": self.n_examples, "n_tokens": self.n_tokens, "meta": self.meta}

    def state_dict(self) -> dict[str, Any]:
        """The float64 sums and the header (format version, options, counts, meta) as one flat state."""
        return {"sum_abs": self.sum_abs.clone(), "signed_sum": self.signed_sum.clone(), **self._header()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "RelevanceScores":
        """Rebuild from :meth:`state_dict` output (checks the format version)."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"relevance state has format version {state.get('format_version')!r}; this tl_taskmap reads {FORMAT_VERSION}")
        fields = ("n_examples", "n_tokens", "aggregate", "positions", "name", "meta")
        return cls(state["sum_abs"], state["signed_sum"], **{k: state[k] for k in fields})

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write to a ``.safetensors`` file (float64 sums + a JSON header with a format version; no pickle).

        Example:
            >>> rel.save("sst2.safetensors"); RelevanceScores.load("sst2.safetensors")   # doctest: +SKIP
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"relevance is saved as safetensors: use a '.safetensors' path, got {path.name!r}")
        tensors = {"sum_abs": self.sum_abs.contiguous(), "signed_sum": self.signed_sum.contiguous()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self._header())})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "RelevanceScores":
        """Read scores written by :meth:`save`. Example: ``RelevanceScores.load("sst2.safetensors")``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{path} has no {_META_KEY!r} metadata; was it written by RelevanceScores.save?")
            header = json.loads(raw)
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"{path} has relevance format version {version!r}; this tl_taskmap reads version {FORMAT_VERSION}")
            missing = {"sum_abs", "signed_sum"} - set(handle.keys())
            if missing:
                raise ValueError(f"{path} is missing tensor(s) {sorted(missing)}")
            sum_abs, signed = handle.get_tensor("sum_abs"), handle.get_tensor("signed_sum")
        keys = ("n_examples", "n_tokens", "aggregate", "positions", "name", "meta")
        return cls(sum_abs, signed, **{k: header[k] for k in keys})


# Kept under its old name: benchmarks and tests use it.
_relevance_mode = gradient_mode


class RelevanceProbe(Probe):
    """Grad × activation relevance of every MLP neuron, as a probe (needs one backward per batch).

    Args:
        aggregate: ``"sum_abs"`` (default) or ``"abs_sum"``; see the module docstring.
        positions: ``"answer"`` (default), ``"prompt"``, ``"all"`` or ``"last_prompt"``.
        loss_fn: ``loss_fn(logits, batch) -> [batch]`` per-example loss (pluggable: e.g. a contrastive or
            margin loss over the answer options); default: mean answer NLL.
        model: Only this model (default: every model the driver runs).

    ``result(task=None, model=None)`` is the :class:`RelevanceScores` of one task and model.

    Example:
        >>> rel = run_probes(model, task, [RelevanceProbe()])[0].result()   # doctest: +SKIP
        >>> rel.top(0.1)                                                    # doctest: +SKIP
    """

    needs_grad = True
    needs_targets = True
    #: The scores built from each batch; what the NaN error calls them.
    scores_class: type = RelevanceScores
    label = "relevance"

    def __init__(self, aggregate: Aggregate = "sum_abs", positions: Positions = "answer", loss_fn: Optional[LossFn] = None,
                 model: Optional[str] = None):
        _check_choice(aggregate, AGGREGATES, "aggregate")
        _check_choice(positions, POSITIONS, "positions")
        self.aggregate, self.positions, self.loss_fn, self.model = aggregate, positions, loss_fn, model
        self.scores_: dict[tuple[str, str], RelevanceScores] = {}

    @property
    def loss_key(self) -> Any:
        return ("answer_nll",) if self.loss_fn is None else ("loss_fn", id(self.loss_fn))

    @property
    def loss_name(self) -> str:
        return "answer_nll(mean)" if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        if not self.uses(model):
            return []
        if adapter.d_mlp is None:
            raise ValueError("the model's cfg has no d_mlp: relevance needs MLP neurons (mlp.hook_post)")
        self.__dict__.setdefault("meta_", {})[model] = relevance_meta(adapter, self.loss_name)
        return [adapter.hook_name(layer, "mlp_post") for layer in range(adapter.n_layers)]

    @property
    def logit_positions(self) -> Optional[Callable[[TokenBatch], Tensor]]:
        """The default loss reads the logits at the answer-predicting positions only (the driver then
        unembeds just those rows); a custom ``loss_fn`` gets the full logits."""
        return answer_predicting_positions if self.loss_fn is None else None

    def loss_at(self, row_logits: Tensor, rows: Tensor, cols: Tensor, batch: TokenBatch) -> Float[Tensor, " batch"]:
        """The default loss from the logits at ``logit_positions`` (rows of ``[n, d_vocab]``)."""
        return self._check_losses(answer_nll_from_rows(row_logits, rows, cols, batch), batch)

    def loss(self, logits: Tensor, batch: TokenBatch) -> Float[Tensor, " batch"]:
        if self.loss_fn is None:
            losses = answer_nll_at_answers(logits, batch)
        else:
            losses = self.loss_fn(logits, batch)
            if not isinstance(losses, Tensor) or losses.shape != (len(batch),):
                shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return one loss per example, shape ({len(batch)},), got {shape}")
        return self._check_losses(losses, batch)

    @staticmethod
    def _check_losses(losses: Tensor, batch: TokenBatch) -> Tensor:
        if not bool(torch.isfinite(losses).all()):
            rows = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
            raise ValueError(f"the loss is NaN or infinite for rows {rows[:5]} of the batch; relevance would be NaN")
        return losses

    def unit_terms(self, model: str, prod: Tensor) -> Tensor:
        """The per-unit terms of the products ``g·a`` at the counted positions (``[..., n, d] → [..., n, units]``):
        one per neuron here; subclasses group features into units (heads sum their ``d_head`` features)."""
        return prod

    def update(self, batch: ProbeBatch) -> None:
        for model, acts in batch.acts.items():
            names = list(acts)
            mask = position_mask(batch.tokens, self.positions)
            rows, cols = mask.nonzero(as_tuple=True)
            # Only the counted positions, all layers stacked: one product and two float64 sums.
            grads, values = batch.grads[model], acts
            devices = {values[h].device for h in names}
            if len(devices) == 1:
                dev = next(iter(devices))
                r, c = rows.to(dev), cols.to(dev)
                prod = self.unit_terms(model, torch.stack([grads[h][r, c].float() * values[h][r, c].float() for h in names]))
                sum_abs = prod.abs().sum(1, dtype=torch.float64).cpu()
                signed = prod.sum(1, dtype=torch.float64).cpu()
            else:  # layers spread over devices (device_map): one layer at a time
                parts = [self.unit_terms(model, grads[h][rows.to(values[h].device), cols.to(values[h].device)].float()
                                         * values[h][rows.to(values[h].device), cols.to(values[h].device)].float()) for h in names]
                sum_abs = torch.stack([p.abs().sum(0, dtype=torch.float64).cpu() for p in parts])
                signed = torch.stack([p.sum(0, dtype=torch.float64).cpu() for p in parts])
            if not bool(torch.isfinite(sum_abs).all()):
                layer = int(torch.nonzero(~torch.isfinite(sum_abs).all(1))[0])
                raise ValueError(f"{self.label} is NaN or infinite in layer {layer} ({names[layer]}): "
                                 "activations or gradients overflowed (try float32)")
            meta = self.__dict__.get("meta_", {}).get(model, {})
            part = self.scores_class(sum_abs, signed, n_examples=len(batch), n_tokens=int(mask.sum()), aggregate=self.aggregate,
                                     positions=self.positions, name=batch.task, meta=meta)
            key = (batch.task, model)
            self.scores_[key] = self.scores_[key].merge(part) if key in self.scores_ else part

    def result(self, task: Optional[str] = None, model: Optional[str] = None) -> RelevanceScores:
        keys = [k for k in self.scores_ if (task is None or k[0] == task) and (model is None or k[1] == model)]
        if len(keys) != 1:
            raise KeyError(f"{len(keys)} relevance results match task={task!r}, model={model!r}; have {sorted(self.scores_)}")
        return self.scores_[keys[0]]

    def merge(self, other: "RelevanceProbe") -> "RelevanceProbe":
        self._check_same_kind(other)
        for key, scores in other.scores_.items():
            self.scores_[key] = self.scores_[key].merge(scores) if key in self.scores_ else scores
        return self

    def state_dict(self) -> dict[str, Any]:
        keys = list(self.scores_)
        return {**keyed_state({k: {"sum_abs": s.sum_abs, "signed_sum": s.signed_sum} for k, s in self.scores_.items()}),
                "headers": [self.scores_[k]._header() for k in keys]}

    def load_state_dict(self, state: dict[str, Any]) -> "RelevanceProbe":
        entries = unkeyed_state(state)
        fields = ("n_examples", "n_tokens", "aggregate", "positions", "name", "meta")
        self.scores_ = {k: self.scores_class(v["sum_abs"], v["signed_sum"], **{f: h[f] for f in fields})
                        for (k, v), h in zip(entries.items(), state["headers"])}
        return self


def relevance_meta(adapter: ModelAdapter, loss: str) -> dict[str, Any]:
    """The provenance recorded with relevance scores (site, backend, model class, sizes, loss)."""
    a = adapter
    return {"site": "mlp_post", "backend": a.backend, "model": type(getattr(a.model, "original_model", a.model)).__name__,
            "n_layers": a.n_layers, "d_mlp": a.d_mlp, "gated_mlp": a.gated_mlp, "loss": loss}


class DriverEstimator:
    """``add`` / ``fit`` of the relevance estimators: fresh probes fed by one :class:`~tl_taskmap.driver.Driver`.

    Subclasses set ``adapter``, ``name`` and ``result_`` (in ``reset``) and say in :meth:`_probes` which
    probe feeds which result attribute; probes sharing a loss share the one backward pass per batch.
    """

    adapter: ModelAdapter
    name: Optional[str]
    result_: RelevanceScores
    _desc = "relevance"

    def reset(self) -> Any:
        raise NotImplementedError

    def _probes(self) -> dict[str, RelevanceProbe]:
        """``{result attribute: a fresh probe feeding it}``."""
        raise NotImplementedError

    def _absorb(self, probes: Mapping[str, RelevanceProbe]) -> None:
        for attr, probe in probes.items():
            for part in probe.scores_.values():
                current = getattr(self, attr)
                setattr(self, attr, current.merge(type(current)(
                    part.sum_abs, part.signed_sum, n_examples=part.n_examples, n_tokens=part.n_tokens, aggregate=current.aggregate,
                    positions=current.positions, name=current.name, meta=current.meta)))

    def add(self, batch: TokenBatch) -> Any:
        """Add one batch: one forward and one backward for all layers.

        Example:
            >>> est.add(adapter.tokenize(prompts, answers))   # doctest: +SKIP
        """
        probes = self._probes()
        Driver(self.adapter, list(probes.values())).run_batch(batch, task=self.result_.name or "task")
        self._absorb(probes)
        return self

    def fit(self, data: Union[Task, Iterable[TokenBatch]], *, batch_size: int = 8, padding_side: PaddingSide = "left",
            prepend_bos: Optional[bool] = None, progress: bool = False) -> Any:
        """Reset, then add every batch of a task (prompt + target) or of an iterable of TokenBatches.

        Example:
            >>> GradXActRelevance(model).fit(task).result_   # doctest: +SKIP
        """
        self.reset()
        if isinstance(data, Task):
            if len(data) == 0:
                raise ValueError(f"task {data.name!r} has no examples: relevance needs at least one")
            probes = self._probes()
            if self.name is None:
                for attr in probes:
                    getattr(self, attr).name = data.name
            Driver(self.adapter, list(probes.values()), batch_size=batch_size, padding_side=padding_side, prepend_bos=prepend_bos,
                   include_targets=True, progress=progress).run(data)
            self._absorb(probes)
        else:
            for batch in tqdm(data, disable=not progress, desc=f"{self._desc} {self.result_.name or ''}".strip()):
                self.add(batch)
        if self.result_.n_examples == 0:
            raise ValueError("no examples were given: relevance needs at least one batch with one example")
        return self


class GradXActRelevance(DriverEstimator):
    """Streaming grad × activation relevance at ``mlp.hook_post`` of every layer.

    Configure in ``__init__``, feed with :meth:`add` (one batch) or :meth:`fit` (a whole task); the
    accumulated :class:`RelevanceScores` is ``result_``. A thin face over :class:`RelevanceProbe`
    and the driver (one forward and one backward per batch).

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter.
        aggregate: ``"sum_abs"`` (default) or ``"abs_sum"``; see the module docstring.
        positions: ``"answer"`` (default), ``"prompt"``, ``"all"`` or ``"last_prompt"``.
        loss_fn: ``loss_fn(logits, batch) -> [batch]`` per-example loss; default: mean answer NLL.
        name: Name of the result (``fit`` uses the task's name when this is None).

    Example:
        >>> est = GradXActRelevance(model, positions="answer")   # doctest: +SKIP
        >>> for batch in batches: est.add(batch)                 # doctest: +SKIP
        >>> est.result_.top(0.1)                                 # doctest: +SKIP
    """

    def __init__(self, model: Any, *, aggregate: Aggregate = "sum_abs", positions: Positions = "answer",
                 loss_fn: Optional[LossFn] = None, name: Optional[str] = None):
        _check_choice(aggregate, AGGREGATES, "aggregate")
        _check_choice(positions, POSITIONS, "positions")
        self.adapter = as_adapter(model)
        if self.adapter.d_mlp is None:
            raise ValueError("the model's cfg has no d_mlp: relevance needs MLP neurons (mlp.hook_post)")
        # Validates up front: a model without mlp.hook_post fails here, with the hook's name.
        self.hook_names = [self.adapter.hook_name(layer, "mlp_post") for layer in range(self.adapter.n_layers)]
        self.aggregate, self.positions, self.loss_fn, self.name = aggregate, positions, loss_fn, name
        self.reset()

    def _probe(self) -> RelevanceProbe:
        return RelevanceProbe(self.aggregate, self.positions, self.loss_fn)

    def _probes(self) -> dict[str, RelevanceProbe]:
        return {"result_": self._probe()}

    def reset(self) -> "GradXActRelevance":
        """Forget everything added so far."""
        a = self.adapter
        meta = relevance_meta(a, self._probe().loss_name)
        self.result_ = RelevanceScores.empty(a.n_layers, int(a.d_mlp), aggregate=self.aggregate, positions=self.positions,
                                             name=self.name, meta=meta)
        return self

    @property
    def scores_(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Shortcut for ``result_.scores``."""
        return self.result_.scores


def relevance(model: Any, task: Union[Task, Iterable[TokenBatch]], *, aggregate: Aggregate = "sum_abs",
              positions: Positions = "answer", loss_fn: Optional[LossFn] = None, batch_size: int = 8,
              padding_side: PaddingSide = "left", prepend_bos: Optional[bool] = None, progress: bool = False) -> RelevanceScores:
    """Grad × activation relevance of every MLP neuron of ``model`` for ``task``.

    See the module docstring for the options; ``batch_size`` rows go through one forward and one
    backward each.

    Example:
        >>> rel = relevance(model, task)    # doctest: +SKIP
        >>> rel                              # doctest: +SKIP
        RelevanceScores('sst2', n_layers=3, d_mlp=48, aggregate='sum_abs', positions='answer', n_examples=16, ...)
        >>> rel.top(0.10) & other.top(0.10)  # doctest: +SKIP
    """
    estimator = GradXActRelevance(model, aggregate=aggregate, positions=positions, loss_fn=loss_fn)
    estimator.fit(task, batch_size=batch_size, padding_side=padding_side, prepend_bos=prepend_bos, progress=progress)
    return estimator.result_


def relevance_by_task(model: Any, tasks: Union[Task, Sequence[Task], Mapping[str, Task], TaskSuite], **kwargs: Any) -> dict[str, RelevanceScores]:
    """:func:`relevance` for every task of a suite, keyed by task name (same keyword options).

    Example:
        >>> rels = relevance_by_task(model, suite)                              # doctest: +SKIP
        >>> sets = {name: rel.top(0.1) for name, rel in rels.items()}           # doctest: +SKIP
    """
    return {task.name: relevance(model, task, **kwargs) for task in as_suite(tasks)}
