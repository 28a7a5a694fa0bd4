"""Streamed activation capture at TransformerLens hook points, reduced to one vector per example.

Only the hooks asked for are registered, each reduces its activation (last real token, mean over
real tokens, a fixed position, or a callable) inside the hook, and the reduced batch goes straight
to a *sink* (:mod:`tl_taskmap.sinks`): memory, disk, or any accumulator. Memory therefore grows with
``n_examples × n_sites × d``, never with sequence length or with the number of hooks in the model.

Example:
    >>> from tl_taskmap.activations import capture
    >>> acts = capture(model, ["The cat sat", "A dog ran far"], sites="resid_post", reduce="last")  # doctest: +SKIP
    >>> acts["blocks.0.hook_resid_post"].shape                                                     # doctest: +SKIP
    torch.Size([2, 576])
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.models import ModelAdapter, PaddingSide, TokenBatch, as_adapter
from tl_taskmap.sinks import (  # noqa: F401  (re-exported: the sinks are part of the capture API)
    AccumulatorSink,
    ActivationSink,
    Activations,
    CallbackSink,
    DiskSink,
    MemorySink,
    load_disk_activations,
)
from tl_taskmap.sites import Site, SiteSpec, resolve_sites  # noqa: F401
from tl_taskmap.driver import Driver
from tl_taskmap.probes import ProbeBatch, SiteProbe

Reduction = Union[str, int, Callable[[Tensor, TokenBatch], Tensor]]


# ---------------------------------------------------------------------------- reductions
def reduce_activations(
    acts: Float[Tensor, "batch pos d"], batch: TokenBatch, reduce: Reduction
) -> Float[Tensor, "batch d"]:
    """Reduce per-token activations to one vector per example, counting real tokens only.

    Args:
        acts: Activations at one hook point.
        batch: The batch they came from (its attention mask says which tokens are real).
        reduce: ``"last"`` (last real token), ``"mean"`` (mean over real tokens), an int position
            among the real tokens (``0`` first, ``-1`` last), or a callable ``(acts, batch) -> [batch, d]``.
    """
    mask = batch.attention_mask.to(acts.device)
    if callable(reduce):
        return reduce(acts, batch)
    if reduce == "last":
        if batch.padding_side == "left":
            return acts[:, -1]
        return acts[torch.arange(acts.shape[0], device=acts.device), batch.last_index.to(acts.device)]
    if reduce == "mean":
        weights = mask.to(acts.dtype).unsqueeze(-1)
        return (acts * weights).sum(1) / weights.sum(1).clamp(min=1)
    if isinstance(reduce, int):
        lengths = mask.sum(1)
        first = (mask.shape[1] - lengths) if batch.padding_side == "left" else torch.zeros_like(lengths)
        offset = torch.full_like(lengths, reduce) if reduce >= 0 else lengths + reduce
        if bool(((offset < 0) | (offset >= lengths)).any()):
            raise ValueError(f"position {reduce} is outside some prompts (shortest has {int(lengths.min())} tokens)")
        return acts[torch.arange(acts.shape[0], device=acts.device), first + offset]
    raise ValueError(f"unknown reduce {reduce!r}: use 'last', 'mean', an int position, or a callable(acts, batch)")


# ---------------------------------------------------------------------------- capture
class Capturer:
    """Runs batches through one model and returns reduced activations at fixed sites.

    The building block of :func:`capture` and of runners that feed several models batch by batch
    (one forward pass per model per batch).

    Example:
        >>> cap = Capturer(model, sites="resid_post", reduce="last")   # doctest: +SKIP
        >>> out = cap.run_batch(["The cat sat", "A dog"])                # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        sites: SiteSpec,
        reduce: Reduction = "last",
        *,
        padding_side: PaddingSide = "left",
        prepend_bos: Optional[bool] = None,
        max_length: Optional[int] = None,
        stop_early: bool = True,
    ):
        self.adapter: ModelAdapter = as_adapter(model)
        self.sites = resolve_sites(self.adapter, sites)
        if not (callable(reduce) or reduce in ("last", "mean") or isinstance(reduce, int)):
            raise ValueError(f"unknown reduce {reduce!r}: use 'last', 'mean', an int position, or a callable(acts, batch)")
        self.reduce = reduce
        self.padding_side: PaddingSide = padding_side
        self.prepend_bos = prepend_bos
        self.max_length = max_length
        self.stop_early = stop_early

    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        return self.adapter.tokenize(prompts, padding_side=self.padding_side, prepend_bos=self.prepend_bos, max_length=self.max_length)

    def run_batch(self, batch: Union[Sequence[str], TokenBatch]) -> dict[Site, Float[Tensor, "batch d"]]:
        """One forward pass; returns ``{site: [batch, d]}`` on the model's device, in the model's dtype."""
        if not isinstance(batch, TokenBatch):
            batch = self.tokenize(batch)
        probe = _LastBatchProbe(self.sites, self.reduce, self.adapter.dtype)
        Driver(self.adapter, [probe], stop_early=self.stop_early).run_batch(batch)
        return probe.last_


class _LastBatchProbe(SiteProbe):
    """Keeps the reduced activations of the latest batch (for :class:`Capturer` and sinks)."""

    def __init__(self, sites: list[Site], reduce: Reduction, model_dtype: torch.dtype, sink: Optional[ActivationSink] = None):
        self.sites, self.reduce, self.model_dtype, self.sink, self.model = sites, reduce, model_dtype, sink, None
        self.last_: dict[Site, Tensor] = {}

    def update(self, batch: ProbeBatch) -> None:
        (acts,) = batch.acts.values()
        self.last_ = {}
        for name, x in acts.items():
            site = self._site(name)
            self.last_[site] = batch.reduce(x, self.reduce)
            check_finite(self.last_[site], site, self.model_dtype)
        if self.sink is not None:
            self.sink.add(self.last_, batch.start)


def check_finite(acts: Tensor, site: Site, model_dtype: torch.dtype) -> None:
    """Raise a clear error naming the layer when activations hold NaN or inf."""
    if not bool(torch.isfinite(acts).all()):
        hint = (
            " The model runs in float16, whose range is ±65504: this looks like an fp16 overflow; load it in bfloat16 or float32."
            if model_dtype == torch.float16
            else " Check the model's weights and inputs (a NaN in a weight spreads to every later layer)."
        )
        raise FloatingPointError(f"non-finite (NaN/inf) activations at layer {site.layer} ({site.hook_name}).{hint}")


def check_prompts(adapter: ModelAdapter, prompts: Sequence[str], *, max_length: Optional[int] = None, prepend_bos: Optional[bool] = None) -> None:
    """Fail before any forward pass on a non-string or too-long prompt, naming it."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, expected str")
    limit = max_length or adapter.n_ctx
    if limit is None:
        return
    bos = int(adapter.default_prepend_bos if prepend_bos is None else prepend_bos)
    for i, ids in enumerate(adapter.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]):
        if len(ids) + bos > limit:
            raise ValueError(
                f"prompt {i} is {len(ids) + bos} tokens long, longer than the model's context of {limit} tokens; "
                "shorten it or truncate the task's prompts"
            )


def iter_batches(items: Sequence[Any], batch_size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """``(start, chunk)`` pairs over ``items`` in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield start, items[start : start + batch_size]


def capture(
    model: Any,
    prompts: Sequence[str],
    sites: SiteSpec = "resid_post",
    reduce: Reduction = "last",
    *,
    batch_size: int = 8,
    sink: Optional[ActivationSink] = None,
    padding_side: PaddingSide = "left",
    prepend_bos: Optional[bool] = None,
    max_length: Optional[int] = None,
    progress: bool = True,
) -> Any:
    """Capture reduced activations of ``prompts`` at ``sites``, streamed batch by batch into ``sink``.

    Args:
        model: A HookedTransformer, TransformerBridge or :class:`ModelAdapter`.
        prompts: The inputs (e.g. one task's prompts).
        sites: ``"resid_post"`` (all layers), ``[(3, "mlp_post")]``, hook names, or a list of these.
        reduce: ``"last"`` real token, ``"mean"`` over real tokens, an int position, or a callable.
        batch_size: Prompts per forward pass.
        sink: Where batches go; defaults to :class:`MemorySink` (float32 on CPU). Use
            :class:`DiskSink` for N too large for memory, or an accumulator.
        padding_side: Pad on the ``"left"`` or ``"right"``; results do not depend on it.
        prepend_bos: Prepend BOS (default: the model's setting).
        max_length: Longest prompt allowed (default: the model's context length).
        progress: Show a progress bar.

    Returns:
        Whatever ``sink.finish()`` returns: :class:`Activations` for the memory and disk sinks.

    A thin face over the driver (:mod:`tl_taskmap.driver`): one forward per batch, stopped after the
    last requested hook point (no later blocks, no unembedding). Only the needed hooks are added, as
    TransformerLens hooks at their own context level (``model.hook_dict[name].fwd_hooks`` lists them
    while it runs), removed on exit (also on an exception or KeyboardInterrupt), so it is safe inside
    a user's own ``model.hooks(...)`` context.

    Example:
        >>> acts = capture(model, prompts, sites=[(0, "resid_post"), (1, "mlp_post")], reduce="mean")  # doctest: +SKIP
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture got no prompts: pass at least one (is the task empty?)")
    capturer = Capturer(model, sites, reduce, padding_side=padding_side, prepend_bos=prepend_bos, max_length=max_length)
    check_prompts(capturer.adapter, prompts, max_length=max_length, prepend_bos=prepend_bos)
    sink = sink if sink is not None else MemorySink()
    sink.start(capturer.sites, len(prompts))
    probe = _LastBatchProbe(capturer.sites, capturer.reduce, capturer.adapter.dtype, sink)
    driver = Driver(capturer.adapter, [probe], batch_size=batch_size, padding_side=padding_side, prepend_bos=prepend_bos,
                    max_length=max_length, include_targets=False, progress=progress)
    driver.run(prompts)
    return sink.finish()

__all__ = [
    "AccumulatorSink", "ActivationSink", "Activations", "CallbackSink", "Capturer", "DiskSink", "MemorySink", "Site",
    "capture", "check_finite", "check_prompts", "iter_batches", "load_disk_activations", "reduce_activations", "resolve_sites",
]
