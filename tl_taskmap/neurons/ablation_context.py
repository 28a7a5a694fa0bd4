"""What an ablation context yields, and the pieces every unit kind's ablation shares.

:func:`tl_taskmap.neurons.ablation.ablate` (neurons, and heads through
:func:`tl_taskmap.neurons.head_ablation.ablate_heads`) yields an :class:`Ablation`; both read reference
prompts with :func:`_prompts_of`. Kept apart so the neuron and head modules import it without
importing each other.

Example:
    >>> MODES
    ('zero', 'mean', 'params')
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch

from tl_taskmap.driver import Driver
from tl_taskmap.models import ModelAdapter
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.probes import MeanActivationProbe
from tl_taskmap.tasks import Task, TaskSuite, as_suite

__all__ = ["MODES", "Ablation", "AblationMode"]

AblationMode = Literal["zero", "mean", "params"]
MODES = ("zero", "mean", "params")


@dataclass(frozen=True)
class Ablation:
    """What :func:`ablate` yields: the model's adapter, the ablated set and how it is ablated.

    Attributes:
        adapter: The model's :class:`~tl_taskmap.models.ModelAdapter` (``.forward``, ``.tokenize``, ...).
        neurons: The ablated neurons.
        mode: ``"zero"``, ``"mean"`` or ``"params"``.
        hook_names: The hook points carrying an ablation hook (empty for ``"params"`` and empty sets).
    """

    adapter: ModelAdapter
    neurons: NeuronSet
    mode: str
    hook_names: tuple[str, ...]

    @property
    def model(self) -> Any:
        return self.adapter.model


def measure_means(probe: MeanActivationProbe, model: Any, prompts_or_task: Any, **options: Any) -> torch.Tensor:
    """Feed the prompts of ``prompts_or_task`` (no targets) to a mean-activation probe through the driver; its result.

    ``options`` go to :class:`~tl_taskmap.driver.Driver` (``batch_size``, ``prepend_bos``, ``progress``).
    """
    Driver(model, [probe], include_targets=False, **options).run(_prompts_of(prompts_or_task))
    return probe.result()


def _prompts_of(source: Any) -> list[str]:
    if isinstance(source, str):
        raise TypeError("pass a list of prompts (or a Task), not a single string")
    if isinstance(source, (Task, TaskSuite)) or (isinstance(source, Sequence) and source and isinstance(source[0], Task)):
        return [p for task in as_suite(source) for p in task.prompts]
    prompts = list(source)
    if not prompts:
        raise ValueError("no reference prompts: pass at least one prompt or a Task")
    return prompts


@contextlib.contextmanager
def zeroed_slices(slices: Sequence[tuple[torch.nn.Parameter, int, torch.Tensor]]) -> Iterator[None]:
    """Zero ``param.index_select(dim, index)`` for every ``(param, dim, index)`` inside the block; restore afterwards.

    Every slice is saved before anything changes, so an interruption at any point restores cleanly.
    """
    saved = [(param, dim, index, param.detach().index_select(dim, index)) for param, dim, index in slices]
    try:
        with torch.no_grad():
            for param, dim, index, _ in saved:
                param.index_fill_(dim, index, 0)
        yield
    finally:
        with torch.no_grad():
            for param, dim, index, original in reversed(saved):  # reversed: shared tensors end up original
                param.index_copy_(dim, index, original)


def check_mean_tensor(means: Any, expected: tuple[int, ...], dims: str, *, missing: str, hint: str = "") -> torch.Tensor:
    """Validate ``mean_activations`` for ``mode="mean"``: given, of shape ``expected`` (named ``dims``), finite floats.

    ``missing`` is the error when none were given; ``hint`` ends the wrong-shape error.
    """
    if means is None:
        raise ValueError(missing)
    means = torch.as_tensor(means).detach()
    if tuple(means.shape) != expected:
        raise ValueError(f"mean_activations has shape {tuple(means.shape)}, expected ({dims}) = {expected}{hint}")
    if not means.is_floating_point() or not bool(torch.isfinite(means).all()):
        raise ValueError("mean_activations must be finite floating-point values")
    return means
