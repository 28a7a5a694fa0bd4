"""Deactivating FFN neurons: ``with ablate(model, neurons): ...`` and its effect on tasks.

Leng & Xiong (2024) deactivate task-specific neurons "by setting the activation value of these
neurons to zero or by directly setting the corresponding parameter to zero". :func:`ablate` does
either, for a :class:`~tl_taskmap.neurons.sets.NeuronSet`, and always restores the model:

* ``mode="zero"``: a hook on each layer's ``mlp.hook_post`` (the FFN hidden layer, the input of the
  output projection) sets the neurons' activations to 0.
* ``mode="mean"``: the same hook sets them to their mean activation (``mean_activations``, measured on
  a reference set with :func:`mean_activations`).
* ``mode="params"``: the neurons' input weights, gate weights (gated MLPs), input biases and output
  weights are zeroed in place, and written back bit for bit on exit.

``"zero"`` and ``"params"`` give the same logits: a zeroed output row removes the neuron's contribution
whatever its activation. With the input side zeroed too, the neuron's pre-activation is exactly 0, so
its ``hook_post`` value is ``act(0) = 0`` for GELU (all variants), SiLU and ReLU (and ``act(0) · 0`` for
gated MLPs): activations read inside either context agree as well. SoLU's LayerNorm mixes neurons,
so ``"params"`` refuses SoLU models.

Example:
    >>> from tl_taskmap.neurons.ablation import ablate, ablation_effect
    >>> with ablate(model, task_neurons, mode="zero"):          # doctest: +SKIP
    ...     logits = model("The movie was great")
    >>> ablation_effect(model, task, task_neurons).delta         # doctest: +SKIP
    -0.24
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.evaluate import TaskScore, bootstrap_interval, evaluate_task
from tl_taskmap.hooks import tl_hooks
from tl_taskmap.models import SITE_TEMPLATES, ModelAdapter, as_adapter
from tl_taskmap.neurons.ablation_context import (  # noqa: F401 - _prompts_of re-exported
    MODES, Ablation, AblationMode, _prompts_of, check_mean_tensor, measure_means, zeroed_slices,
)
from tl_taskmap.neurons.sets import HeadSet, NeuronSet
from tl_taskmap.probes import MeanActivationProbe
from tl_taskmap.tasks import Task, TaskSuite, as_suite

def check_neuron_set(model: Any, neurons: NeuronSet) -> ModelAdapter:
    """Raise a ValueError naming the layer and sizes unless ``neurons`` fits ``model``; return its adapter.

    Example:
        >>> check_neuron_set(model, NeuronSet.empty(3, 48))   # doctest: +SKIP
    """
    if isinstance(neurons, HeadSet):  # attention heads: see tl_taskmap.neurons.heads
        from tl_taskmap.neurons.heads import check_head_set

        return check_head_set(model, neurons)
    adapter = as_adapter(model)
    if not isinstance(neurons, NeuronSet):
        raise TypeError(f"expected a NeuronSet, got {type(neurons).__name__}")
    if adapter.d_mlp is None:
        raise ValueError("the model has no MLP neurons (cfg.d_mlp is unset); there is nothing to ablate")
    neurons.check_fits_model(adapter.n_layers, adapter.d_mlp, "ablate")
    return adapter


def _check_means(adapter: ModelAdapter, means: Any) -> Tensor:
    return check_mean_tensor(means, (adapter.n_layers, adapter.d_mlp), "n_layers, d_mlp", missing=(
        "mode='mean' needs mean_activations=[n_layers, d_mlp]; measure them with mean_activations(model, reference_prompts)"))


@contextlib.contextmanager
def ablate(
    model: Any,
    neurons: NeuronSet,
    mode: AblationMode = "zero",
    *,
    mean_activations: Optional[Float[Tensor, "n_layers d_mlp"]] = None,
) -> Iterator[Ablation]:
    """Deactivate ``neurons`` for the duration of a ``with`` block; the model is restored exactly on exit.

    Everything is validated before the model is touched. On exit, also on an exception or
    KeyboardInterrupt, the ablation hooks are removed and zeroed parameters are written back bit for
    bit. Contexts nest (inner ones are undone first) and compose with ``model.hooks(...)``: at a
    ``hook_post`` point, hooks added before the ablation see the activation before it is replaced,
    hooks added inside the block see the ablated one. An empty set is an exact no-op.

    Args:
        model: A HookedTransformer, TransformerBridge or ModelAdapter.
        neurons: The neurons to deactivate, built for this model's ``(n_layers, d_mlp)``; a
            :class:`~tl_taskmap.neurons.sets.HeadSet` switches attention heads off instead
            (:func:`~tl_taskmap.neurons.head_ablation.ablate_heads`: same modes, ``"params"`` zeroes ``W_O`` rows).
        mode: ``"zero"`` (activations set to 0, default), ``"mean"`` (set to ``mean_activations``) or
            ``"params"`` (input, gate and output weights and input bias set to 0 in place).
        mean_activations: Per-neuron values for ``mode="mean"``, from :func:`mean_activations`.

    Yields:
        An :class:`Ablation` handle (``.adapter``, ``.neurons``, ``.mode``, ``.hook_names``).

    Raises:
        ValueError: a set built for another model shape (naming the layer and sizes), a bad mode,
            missing or misshapen means, or ``"params"`` on a SoLU model.

    Example:
        >>> with ablate(model, NeuronSet(3, 48, {1: [0, 5]}), mode="params") as handle:   # doctest: +SKIP
        ...     logits = handle.adapter.forward(batch)
    """
    if isinstance(neurons, HeadSet):  # attention heads: hook_z / W_O rows, in tl_taskmap.neurons.head_ablation
        from tl_taskmap.neurons.head_ablation import ablate_heads

        with ablate_heads(model, neurons, mode, mean_activations=mean_activations) as handle:
            yield handle
        return
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}: use one of {MODES}")
    adapter = check_neuron_set(model, neurons)
    means = _check_means(adapter, mean_activations) if mode == "mean" else None
    if mode != "mean" and mean_activations is not None:
        raise ValueError(f"mean_activations is only used with mode='mean', not mode={mode!r}")
    if mode == "params":
        with _zeroed_params(adapter, neurons):
            yield Ablation(adapter, neurons, mode, ())
        return
    masks = neurons.to_mask()
    hooks = [(SITE_TEMPLATES["mlp_post"].format(layer=layer), _replace_hook(masks[layer], None if means is None else means[layer], layer))
             for layer in neurons.layers()]
    # TransformerLens hooks at a new context level: hook_dict lists them, reset_hooks() removes them.
    with tl_hooks(adapter.model, hooks):
        yield Ablation(adapter, neurons, mode, tuple(name for name, _ in hooks))


def _replace_hook(mask: Tensor, fill: Optional[Tensor], layer: int) -> Callable[..., Tensor]:
    """A TransformerLens hook ``(act, hook) -> act`` replacing the neurons' activations."""
    # Masks (and means) are moved to the activation's device and dtype once, on first use.
    cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Optional[Tensor]]] = {}

    def hook(act: Tensor, hook: Any) -> Tensor:
        if act.shape[-1] != mask.shape[0]:
            raise ValueError(f"layer {layer}: mlp.hook_post has {act.shape[-1]} neurons, the NeuronSet expects d_mlp={mask.shape[0]}")
        key = (act.device, act.dtype)
        if key not in cache:
            cache[key] = (mask.to(act.device), None if fill is None else fill.to(act.device, act.dtype))
        on_device, value = cache[key]
        # Out of place, so autograd through the replaced activation stays valid.
        return act.masked_fill(on_device, 0) if value is None else torch.where(on_device, value, act)

    return hook


@contextlib.contextmanager
def _zeroed_params(adapter: ModelAdapter, neurons: NeuronSet) -> Iterator[None]:
    act_fn = str(getattr(adapter.model.cfg, "act_fn", "") or "").lower()
    if "solu" in act_fn:
        raise ValueError(f"mode='params' is not exact for act_fn={act_fn!r} (its LayerNorm mixes neurons); use mode='zero'")
    slices = [(p.param, p.dim, neurons.indices(layer).to(p.param.device))
              for layer in neurons.layers() for p in adapter.neuron_params(layer)]
    with zeroed_slices(slices):
        yield


# ---------------------------------------------------------------------------- mean activations
def mean_activations(
    model: Any,
    prompts_or_task: Sequence[str] | Task | TaskSuite | Sequence[Task],
    *,
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    progress: bool = False,
) -> Float[Tensor, "n_layers d_mlp"]:
    """Mean ``mlp.hook_post`` activation of every neuron over all real tokens of a reference set.

    Every real (non-padding) token of every prompt counts once, BOS included; for tasks the prompts
    are used (not the targets). The activations are streamed through
    the driver (:class:`~tl_taskmap.probes.MeanActivationProbe`) and summed in float64, so memory does not grow with the set.
    Hooks already on the model apply; measure outside any ablation.

    Returns:
        float32 means on the CPU, ready for ``ablate(..., mode="mean", mean_activations=...)``.

    Example:
        >>> means = mean_activations(model, reference_task)                                  # doctest: +SKIP
        >>> with ablate(model, neurons, mode="mean", mean_activations=means): ...           # doctest: +SKIP
    """
    return measure_means(MeanActivationProbe(), as_adapter(model), prompts_or_task, batch_size=batch_size, prepend_bos=prepend_bos,
                         progress=progress)


# ---------------------------------------------------------------------------- effects
@dataclass
class AblationEffect:
    """A task's score with and without an ablation.

    Attributes:
        baseline: The unablated :class:`~tl_taskmap.evaluate.TaskScore`.
        ablated: The score inside the ablation context.
        neurons: Name of the ablated set (may be None). mode: the ablation mode.
    """

    baseline: TaskScore
    ablated: TaskScore
    neurons: Optional[str] = None
    mode: str = "zero"

    @property
    def task(self) -> str:
        return self.baseline.task

    @property
    def metric(self) -> str:
        return self.baseline.metric

    @property
    def delta(self) -> float:
        """Metric change, ablated − baseline (negative: the ablation hurts)."""
        return self.ablated.metric_value - self.baseline.metric_value

    @property
    def loss_delta(self) -> float:
        """Answer-loss change, ablated − baseline (positive: the ablation hurts)."""
        return self.ablated.loss - self.baseline.loss

    def interval(self, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
        """Paired per-example bootstrap interval of :attr:`delta`."""
        return paired_delta_interval(self.baseline.per_example, self.ablated.per_example, n_boot=n_boot, alpha=alpha, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval()
        return {
            "task": self.task, "metric": self.metric, "ablated_set": self.neurons, "mode": self.mode,
            "baseline": self.baseline.metric_value, "ablated": self.ablated.metric_value, "delta": self.delta,
            "baseline_loss": self.baseline.loss, "ablated_loss": self.ablated.loss, "loss_delta": self.loss_delta,
            "ci_low": low, "ci_high": high,
        }

    def __repr__(self) -> str:
        return (
            f"AblationEffect({self.task!r}, {self.metric}: {self.baseline.metric_value:.3f} → {self.ablated.metric_value:.3f} "
            f"(Δ {self.delta:+.3f}), loss Δ {self.loss_delta:+.3f}, mode={self.mode!r})"
        )


def paired_delta_interval(
    baseline: Sequence[float], ablated: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of ``mean(ablated) − mean(baseline)`` resampling examples (paired).

    Example:
        >>> paired_delta_interval([1, 1, 0, 1], [0, 1, 0, 0])   # doctest: +SKIP
        (-1.0, 0.0)
    """
    if len(baseline) != len(ablated):
        raise ValueError(f"paired scores differ in length: {len(baseline)} baseline vs {len(ablated)} ablated examples")
    return bootstrap_interval([a - b for a, b in zip(ablated, baseline)], n_boot=n_boot, alpha=alpha, seed=seed)


def ablation_effect(
    model: Any,
    task: Task,
    neurons: NeuronSet,
    mode: AblationMode = "zero",
    *,
    mean_activations: Optional[Float[Tensor, "n_layers d_mlp"]] = None,
    baseline: Optional[TaskScore] = None,
    batch_size: int = 8,
    **eval_kwargs: Any,
) -> AblationEffect:
    """Score ``task`` with and without ablating ``neurons`` (loss and the task's metric).

    The metric is the task's own (see :mod:`tl_taskmap.evaluate`): accuracy by option likelihood for
    multiple choice, greedy exact match or ROUGE-L for generation. Pass ``baseline`` to reuse an
    unablated score. Extra keyword arguments go to :func:`~tl_taskmap.evaluate.evaluate_task`.

    Example:
        >>> effect = ablation_effect(model, sst2, sets["sst2"])   # doctest: +SKIP
        >>> effect.delta, effect.loss_delta, effect.interval()     # doctest: +SKIP
    """
    check_neuron_set(model, neurons)
    if baseline is None:
        baseline = evaluate_task(model, task, batch_size=batch_size, **eval_kwargs)
    with ablate(model, neurons, mode, mean_activations=mean_activations):
        ablated = evaluate_task(model, task, batch_size=batch_size, **eval_kwargs)
    return AblationEffect(baseline, ablated, neurons.name, mode)


def ablation_effects(
    model: Any,
    tasks: Task | Sequence[Task] | TaskSuite,
    neurons: NeuronSet,
    mode: AblationMode = "zero",
    *,
    mean_activations: Optional[Float[Tensor, "n_layers d_mlp"]] = None,
    batch_size: int = 8,
    **eval_kwargs: Any,
) -> pd.DataFrame:
    """One ablation, every task: a DataFrame of :meth:`AblationEffect.to_dict` rows.

    Columns: task, metric, ablated_set, mode, baseline, ablated, delta, baseline_loss, ablated_loss,
    loss_delta, ci_low, ci_high (paired per-example bootstrap of delta).

    Example:
        >>> ablation_effects(model, suite, sets["sst2"])   # doctest: +SKIP
    """
    suite = as_suite(tasks)
    check_neuron_set(model, neurons)
    baselines = [evaluate_task(model, t, batch_size=batch_size, **eval_kwargs) for t in suite]
    with ablate(model, neurons, mode, mean_activations=mean_activations):
        ablated = [evaluate_task(model, t, batch_size=batch_size, **eval_kwargs) for t in suite]
    return pd.DataFrame([AblationEffect(b, a, neurons.name, mode).to_dict() for b, a in zip(baselines, ablated)])
