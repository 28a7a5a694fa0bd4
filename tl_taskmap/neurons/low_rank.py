"""Low-rank adapters (LoRA) on the attention projections: the paper's way of training control models.

Zhao et al. (2024) train every control model C_t and the multi-task model E as LoRA fine-tunes of the
query and value projections (LLaMA-Factory ``--finetuning_type lora --lora_target q_proj,v_proj``,
rank 8, alpha 16 by its defaults). :class:`LowRank` says which projections get adapters and their
rank; :func:`low_rank_adapters` attaches them for a training loop and merges them into the weights
when the block exits (``W <- W + alpha/rank * down @ up``), so what comes out is an ordinary model.

The adapters work by name on every model class tl_taskmap supports (TransformerLens ``W_Q``/``W_V``
of shape ``[head, d_model, d_head]``, Hugging Face ``q_proj``/``v_proj`` inside a TransformerBridge,
GPT-2's split ``attn.q``/``attn.v``), through ``torch.nn.utils.parametrize``: the forward pass reads
``W + delta`` and the original tensor is never written until the merge. Training them needs no
gradient or optimizer state for the frozen weights, which is what keeps a control model's training
within a few hundred MB beyond the model itself.

Example:
    >>> from tl_taskmap.neurons.masked_training import finetune
    >>> result = finetune(model, task, LowRank(rank=8), steps=10, lr=2e-3)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from tl_taskmap.models import as_adapter

__all__ = ["LowRank", "low_rank_targets", "low_rank_adapters", "LowRankMask"]

# Parameter names (with TransformerBridge's "._original_component" removed) of each projection.
_PATTERNS = {
    "q": r"\.(W_Q|_W_Q|q_proj\.weight|attn\.q\.weight)$",
    "k": r"\.(W_K|_W_K|k_proj\.weight|attn\.k\.weight)$",
    "v": r"\.(W_V|_W_V|v_proj\.weight|attn\.v\.weight)$",
    "o": r"\.(W_O|o_proj\.weight|attn\.o\.weight)$",
}


@dataclass(frozen=True)
class LowRank:
    """Which attention projections get low-rank adapters, and their size.

    Args:
        rank: Rank of each adapter. alpha: Scale numerator (the update is ``alpha / rank * down @ up``).
        targets: Projections among ``"q", "k", "v", "o"`` (default: the paper's query and value).
        seed: Seeds the random ``down`` factors (``up`` starts at zero, so training starts at the model).

    Example:
        >>> LowRank()
        LowRank(rank=8, alpha=16.0, targets=('q', 'v'), seed=0)
        >>> LowRank(rank=4, targets=("q",)).describe()
        'LoRA rank 4 on q'
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LowRank rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(float(self.alpha)) or self.alpha <= 0:
            raise ValueError(f"LowRank alpha must be positive, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(_PATTERNS))
        if unknown or not self.targets:
            raise ValueError(f"LowRank targets must be a non-empty subset of {sorted(_PATTERNS)}, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "alpha", float(self.alpha))

    def describe(self) -> str:
        return f"LoRA rank {self.rank} on {','.join(self.targets)}"


def low_rank_targets(model: Any, targets: tuple[str, ...] = ("q", "v")) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the projection weights ``targets`` select, one per layer each.

    Raises:
        ValueError: a projection is not found once per layer (names the counts and what was found).

    Example:
        >>> low_rank_targets(model)[:2]   # doctest: +SKIP
        ['blocks.0.attn.W_Q', 'blocks.0.attn.W_V']
    """
    adapter = as_adapter(model)
    names = [n for n, _ in adapter.model.named_parameters()]
    chosen: list[str] = []
    for target in targets:
        found = [n for n in names if re.search(_PATTERNS[target], n.replace("._original_component", ""))]
        if len(found) != adapter.n_layers:
            raise ValueError(f"found {len(found)} '{target}' projection weights ({found[:3]}...), expected one per layer "
                             f"({adapter.n_layers}); this architecture names them differently — train with neurons='all' instead")
        chosen.extend(found)
    return sorted(chosen, key=names.index)


class _Delta(torch.nn.Module):
    """``W -> W + scale * down @ up`` (reshaped to W's layout); ``up`` starts at zero."""

    def __init__(self, weight: Tensor, spec: LowRank, generator: torch.Generator):
        super().__init__()
        # [m, n] (a Linear's [out, in], fan-in n) or TransformerLens [head, d_model, d_head] (fan-in d_model).
        self.shape = tuple(weight.shape)
        if len(self.shape) == 2:
            rows, cols, fan_in = self.shape[1], self.shape[0], self.shape[1]
        elif len(self.shape) == 3:
            rows, cols, fan_in = self.shape[1], self.shape[0] * self.shape[2], self.shape[1]
        else:
            raise ValueError(f"low-rank adapters need a 2-D or 3-D weight, got shape {self.shape}")
        bound = 1.0 / math.sqrt(fan_in)
        down = (torch.rand(rows, spec.rank, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.down = torch.nn.Parameter(down.to(device=weight.device, dtype=weight.dtype))
        self.up = torch.nn.Parameter(torch.zeros(spec.rank, cols, device=weight.device, dtype=weight.dtype))
        self.scale = spec.alpha / spec.rank

    def delta(self) -> Tensor:
        d = (self.down @ self.up) * self.scale  # [rows, cols]
        if len(self.shape) == 2:
            return d.T  # [out, in]
        head, d_model, d_head = self.shape
        return d.reshape(d_model, head, d_head).permute(1, 0, 2)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta()


class LowRankMask:
    """What :func:`low_rank_adapters` hands to a training loop (the same interface as an ``UpdateMask``).

    Attributes:
        params: The adapters' factors (what the optimizer trains). n_trainable: their entries.
        n_neurons: None (adapters train no neurons). names: the adapted weights.
    """

    def __init__(self, params: list[Tensor], names: list[str]):
        self.params, self.names = params, names
        self.n_neurons = None
        self.n_trainable = sum(p.numel() for p in params)

    def gather_gradients(self) -> None:
        """Nothing to gather: the factors receive their gradients directly."""

    def write_back(self) -> None:
        """Nothing to write: the forward pass reads ``W + delta`` until the merge at exit."""


@contextlib.contextmanager
def low_rank_adapters(model: Any, spec: LowRank = LowRank()) -> Iterator[LowRankMask]:
    """Attach low-rank adapters inside a ``with`` block; on a normal exit merge them into the weights.

    Inside the block every parameter of the model has ``requires_grad=False`` and the forward pass reads
    ``W + delta`` for the adapted weights. On a normal exit each adapted weight is overwritten in place
    with ``W + delta`` (the same ``Parameter`` objects; nothing else changes); on an exception the model
    is left exactly as it was. ``requires_grad`` flags and ``.grad`` are restored either way.

    Example:
        >>> with low_rank_adapters(model, LowRank()) as mask:        # doctest: +SKIP
        ...     opt = torch.optim.AdamW(mask.params, lr=2e-3)
        ...     loss_fn(model).backward(); opt.step()
    """
    adapter = as_adapter(model)
    net = adapter.model
    names = low_rank_targets(adapter, spec.targets)
    named = dict(net.named_parameters())
    flags = [(p, p.requires_grad, p.grad) for p in named.values()]
    generator = torch.Generator().manual_seed(spec.seed)
    attached: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    orders = {}  # removing a parametrization re-registers the tensor last; keep named_parameters() order as it was
    merged = False
    try:
        for p in named.values():
            p.requires_grad_(False)
            p.grad = None
        deltas = []
        for name in names:
            owner, attr = name.rsplit(".", 1)
            module = net.get_submodule(owner)
            orders.setdefault(id(module), (module, list(module._parameters)))
            delta = _Delta(named[name], spec, generator)
            parametrize.register_parametrization(module, attr, delta, unsafe=True)
            attached.append((module, attr, named[name]))
            deltas.append(delta)
        yield LowRankMask([t for d in deltas for t in (d.down, d.up)], names)
        with torch.no_grad():
            updates = [(original, (original + delta.delta()).to(original.dtype))
                       for (_, _, original), delta in zip(attached, deltas)]
        merged = True
    finally:
        for module, attr, _ in reversed(attached):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for module, order in orders.values():
            entries = [(k, module._parameters.pop(k)) for k in order if k in module._parameters]
            module._parameters.update(entries)
        if merged:
            with torch.no_grad():
                for original, value in updates:
                    original.copy_(value)
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
