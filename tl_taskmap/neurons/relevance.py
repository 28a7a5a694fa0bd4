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
    >>> from tl_taskmap.neurons.relevance import relevance
    >>> rel = relevance(model, task)            # doctest: +SKIP
    >>> neurons = rel.top(0.10)                 # doctest: +SKIP
    >>> rel.save("sst2_relevance.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.evaluate import answer_batches, answer_nll
from tl_taskmap.models import PaddingSide, TokenBatch, as_adapter
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite

FORMAT_VERSION = 1
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
        """Zero scores for a model shape (the start of a stream). Example: ``RelevanceScores.empty(2, 8)``."""
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


@contextlib.contextmanager
def _relevance_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and grad enabled; every flag restored afterwards, even on errors."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("relevance needs gradients but torch.inference_mode() is active; call it outside that block")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


class GradXActRelevance:
    """Streaming grad × activation relevance at ``mlp.hook_post`` of every layer.

    Configure in ``__init__``, feed with :meth:`add` (one batch) or :meth:`fit` (a whole task); the
    accumulated :class:`RelevanceScores` is ``result_``.

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

    def reset(self) -> "GradXActRelevance":
        """Forget everything added so far."""
        a = self.adapter
        loss = "answer_nll(mean)" if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        meta = {"site": "mlp_post", "backend": a.backend, "model": type(getattr(a.model, "original_model", a.model)).__name__,
                "n_layers": a.n_layers, "d_mlp": a.d_mlp, "gated_mlp": a.gated_mlp, "loss": loss}
        self.result_ = RelevanceScores.empty(a.n_layers, int(a.d_mlp), aggregate=self.aggregate, positions=self.positions,
                                             name=self.name, meta=meta)
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

    def add(self, batch: TokenBatch) -> "GradXActRelevance":
        """Add one batch: one forward and one backward for all layers.

        Example:
            >>> est.add(adapter.tokenize(prompts, answers))   # doctest: +SKIP
        """
        a = self.adapter
        batch = batch.to(a.device)
        mask = position_mask(batch, self.positions)
        acts: dict[int, Tensor] = {}

        def keep(layer: int) -> Callable[..., Tensor]:
            def hook(act: Tensor, hook: Any) -> Tensor:
                if layer in acts:
                    raise RuntimeError(f"{hook.name} fired twice in one forward pass; relevance needs it once per layer")
                if not act.requires_grad:  # parameters are frozen, so the first layers start the graph here
                    act = act.detach().requires_grad_(True)
                acts[layer] = act
                return act

            return hook

        with _relevance_mode(a.model), a.hooks([(name, keep(layer)) for layer, name in enumerate(self.hook_names)]):
            logits = a.forward(batch)
            losses = self._losses(logits, batch)
            if not bool(torch.isfinite(losses).all()):
                rows = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
                raise ValueError(f"the loss is NaN or infinite for rows {rows[:5]} of the batch; relevance would be NaN")
            missing = [self.hook_names[layer] for layer in range(a.n_layers) if layer not in acts]
            if missing:
                raise RuntimeError(f"hooks {missing[:3]} did not fire during the forward pass")
            layers = list(range(a.n_layers))
            grads = torch.autograd.grad(losses.sum(), [acts[layer] for layer in layers], allow_unused=True)
        weight = mask.to(torch.float32)[..., None]
        sum_abs, signed = torch.zeros_like(self.result_.sum_abs), torch.zeros_like(self.result_.signed_sum)
        for layer, grad in zip(layers, grads):
            if grad is None:  # the layer does not reach the loss: zero relevance
                continue
            prod = grad.float() * acts[layer].detach().float() * weight.to(grad.device)  # layers may sit on other devices
            sum_abs[layer] = prod.abs().sum((0, 1), dtype=torch.float64).cpu()
            signed[layer] = prod.sum((0, 1), dtype=torch.float64).cpu()
            if not bool(torch.isfinite(sum_abs[layer]).all()):
                raise ValueError(f"relevance is NaN or infinite in layer {layer} ({self.hook_names[layer]}): "
                                 "activations or gradients overflowed (try float32)")
        self.result_ = self.result_.merge(RelevanceScores(
            sum_abs, signed, n_examples=len(batch), n_tokens=int(mask.sum()), aggregate=self.aggregate,
            positions=self.positions, name=self.result_.name, meta=self.result_.meta))
        return self

    def fit(self, data: Union[Task, Iterable[TokenBatch]], *, batch_size: int = 8, padding_side: PaddingSide = "left",
            prepend_bos: Optional[bool] = None, progress: bool = False) -> "GradXActRelevance":
        """Reset, then add every batch of a task (prompt + target) or of an iterable of TokenBatches.

        Example:
            >>> GradXActRelevance(model).fit(task).result_   # doctest: +SKIP
        """
        self.reset()
        if isinstance(data, Task):
            if len(data) == 0:
                raise ValueError(f"task {data.name!r} has no examples: relevance needs at least one")
            if self.name is None:
                self.result_.name = data.name
            batches: Iterable[TokenBatch] = answer_batches(self.adapter, data, batch_size, padding_side=padding_side, prepend_bos=prepend_bos)
            total = -(-len(data) // batch_size)
        else:
            batches, total = data, None
        for batch in tqdm(batches, total=total, disable=not progress, desc=f"relevance {self.result_.name or ''}".strip()):
            try:
                self.add(batch)
            except ValueError as err:  # say which task the batch came from
                raise ValueError(f"task {data.name!r}: {err}" if isinstance(data, Task) else str(err)) from None
        if self.result_.n_examples == 0:
            raise ValueError("no examples were given: relevance needs at least one batch with one example")
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
