"""Attention heads as units: where a head's output is, on both TransformerLens model classes.

A head's output is its slice of ``blocks.{l}.attn.hook_z`` — the attention-weighted values of that
head, the input of the output projection ``W_O`` (before heads are summed into the residual stream):

* ``HookedTransformer`` (TL 3.x): ``hook_z`` is ``[batch, pos, n_heads, d_head]`` and ``W_O`` is the
  parameter ``attn.W_O`` ``[n_heads, d_head, d_model]``; head ``h`` owns ``W_O[h]``.
* ``TransformerBridge`` (TL 3.x and 4.x): ``hook_z`` is an alias of ``attn.o.hook_in``, the flattened
  ``[batch, pos, n_heads * d_head]`` input of the Hugging Face output projection (heads are
  concatenated head-major, so head ``h`` is features ``h*d_head : (h+1)*d_head``); ``W_O`` is that
  projection's weight (``nn.Linear`` ``[d_model, n_heads*d_head]`` or GPT-2's ``Conv1D``
  ``[n_heads*d_head, d_model]``). :func:`split_heads` gives both the 4-D view.

``hook_result`` (per-head outputs after ``W_O``) exists only with ``cfg.use_attn_result`` (a memory
cost of ``n_heads × d_model`` per token), so tl_taskmap reads ``hook_z``: zeroing a head's ``hook_z``
is exactly zeroing its contribution ``z_h W_O[h]`` (the shared bias ``b_O`` stays).

Grouped-query attention (SmolLM2-135M: 9 query heads, 3 key/value heads): ``hook_z`` has one slice
per *query* head (each query head attends with its own pattern, over a K/V head it shares with
``n_heads / n_key_value_heads - 1`` others), and ``W_O`` has rows per query head. The units here are
query heads, ``cfg.n_heads`` per layer; K/V heads are shared inputs, not units, and ablating a query
head leaves the shared K/V head (and the other query heads using it) untouched.

Example:
    >>> from tl_taskmap.neurons.heads import head_layout
    >>> head_layout(model)                                  # doctest: +SKIP
    HeadLayout(n_layers=30, n_heads=9, d_head=64, n_key_value_heads=3, hook='blocks.{layer}.attn.hook_z')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_taskmap.models import ModelAdapter, UnsupportedModelError, as_adapter
from tl_taskmap.neurons.sets import HeadSet

#: The hook holding every head's output before ``W_O``, on both model classes.
HOOK_Z = "blocks.{layer}.attn.hook_z"


@dataclass(frozen=True)
class HeadLayout:
    """Head sizes of a model and where its heads' outputs are hooked.

    Attributes:
        n_layers, n_heads, d_head: Sizes (``n_heads`` query heads per layer).
        n_key_value_heads: Key/value heads per layer under grouped-query attention, else None.
        hook: The hook-name template (``blocks.{layer}.attn.hook_z``).
    """

    n_layers: int
    n_heads: int
    d_head: int
    n_key_value_heads: Optional[int]
    hook: str = HOOK_Z

    def hook_name(self, layer: int) -> str:
        """``blocks.{layer}.attn.hook_z``. Example: ``head_layout(model).hook_name(3)``."""
        return self.hook.format(layer=layer)


def head_layout(model: Any) -> HeadLayout:
    """The head layout of ``model``, checked: every layer must have ``attn.hook_z``.

    Raises:
        UnsupportedModelError: the config has no ``n_heads``/``d_head`` or a layer lacks ``hook_z``.

    Example:
        >>> head_layout(model).n_heads   # doctest: +SKIP
        9
    """
    adapter = as_adapter(model)
    cfg = adapter.model.cfg
    n_heads, d_head = getattr(cfg, "n_heads", None), getattr(cfg, "d_head", None)
    if not n_heads or not d_head or int(n_heads) < 1:
        raise UnsupportedModelError(f"the model's cfg has n_heads={n_heads!r}, d_head={d_head!r}: attention heads need both")
    names = adapter._hook_names
    missing = [HOOK_Z.format(layer=layer) for layer in range(adapter.n_layers) if HOOK_Z.format(layer=layer) not in names]
    if missing:
        raise UnsupportedModelError(
            f"the model has no per-head attention output hook {missing[0]!r} ({len(missing)} layers lack it); "
            "head relevance and head ablation need attn.hook_z in every block"
        )
    kv = getattr(cfg, "n_key_value_heads", None)
    return HeadLayout(adapter.n_layers, int(n_heads), int(d_head), int(kv) if kv else None)


def split_heads(z: Tensor, n_heads: int, d_head: int) -> Float[Tensor, "batch pos n_heads d_head"]:
    """A ``[..., n_heads, d_head]`` view of ``hook_z`` whether it comes 4-D (HookedTransformer) or flat (bridge).

    Example:
        >>> split_heads(torch.zeros(2, 5, 4 * 8), 4, 8).shape
        torch.Size([2, 5, 4, 8])
    """
    if z.shape[-2:] == (n_heads, d_head):
        return z
    if z.shape[-1] == n_heads * d_head:
        return z.unflatten(-1, (n_heads, d_head))
    raise ValueError(f"hook_z has shape {tuple(z.shape)}; expected [..., {n_heads}, {d_head}] or [..., {n_heads * d_head}] "
                     f"(n_heads={n_heads}, d_head={d_head})")


def check_head_set(model: Any, heads: HeadSet) -> ModelAdapter:
    """Raise a ValueError naming the sizes unless ``heads`` fits ``model``; return its adapter.

    Example:
        >>> check_head_set(model, HeadSet.empty(30, 9))   # doctest: +SKIP
    """
    adapter = as_adapter(model)
    if not isinstance(heads, HeadSet):
        raise TypeError(f"expected a HeadSet, got {type(heads).__name__}")
    layout = head_layout(adapter)
    heads.check_fits_model(layout.n_layers, layout.n_heads, "use")
    return adapter


@dataclass(frozen=True)
class HeadOutputWeight:
    """The output-projection weight of one layer and where each head's rows are in it.

    Head ``h`` owns ``param.index_select(dim, rows(h))``: ``W_O[h]`` on HookedTransformer (``block=1``
    along the head axis), ``d_head`` consecutive input features of the HF projection on the bridge.

    Attributes:
        param: The weight (a view into the model: editing it edits the model).
        dim: The dimension indexed by head (or by flattened head feature).
        block: Entries per head along ``dim`` (1 for a head axis, ``d_head`` for flattened features).
    """

    param: torch.nn.Parameter
    dim: int
    block: int

    def rows(self, heads: Int[Tensor, " k"]) -> Int[Tensor, " k_times_block"]:
        """Indices along ``dim`` owned by ``heads``. Example: ``w.rows(torch.tensor([1]))``."""
        heads = torch.as_tensor(heads, dtype=torch.int64).reshape(-1, 1)
        return (heads * self.block + torch.arange(self.block)).reshape(-1)


def head_output_weight(model: Any, layer: int) -> HeadOutputWeight:
    """``W_O`` of ``layer``: the parameter whose rows a head owns (see the module docstring).

    Raises:
        UnsupportedModelError: the attention layout is not one tl_taskmap knows.

    Example:
        >>> w = head_output_weight(model, 0); w.param.shape, w.dim, w.block   # doctest: +SKIP
        (torch.Size([576, 576]), 1, 64)
    """
    adapter = as_adapter(model)
    layout = head_layout(adapter)
    if not 0 <= layer < layout.n_layers:
        raise ValueError(f"layer {layer} is out of range for n_layers={layout.n_layers}")
    attn = adapter.model.blocks[layer].attn
    if adapter.backend == "hooked":
        weight = getattr(attn, "W_O", None)
        if isinstance(weight, torch.nn.Parameter) and weight.shape[:2] == (layout.n_heads, layout.d_head):
            return HeadOutputWeight(weight, 0, 1)
    else:
        out = getattr(attn, "o", None)
        inner = getattr(out, "_original_component", out)
        weight = getattr(inner, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.ndim == 2:
            dim = 0 if type(inner).__name__ == "Conv1D" else 1  # Conv1D stores [in, out]; Linear [out, in]
            if weight.shape[dim] == layout.n_heads * layout.d_head:
                return HeadOutputWeight(weight, dim, layout.d_head)
    raise UnsupportedModelError(
        f"could not find the attention output weight W_O of layer {layer} ({type(attn).__name__}) with "
        f"n_heads={layout.n_heads} x d_head={layout.d_head} inputs; use head ablation mode='zero' instead"
    )
