"""Hooks added the TransformerLens way: through ``HookPoint.add_hook``, visible to the user's TL code.

Every hook tl_taskmap adds (capture, probes, relevance, ablation) goes through :func:`tl_hooks`, which
registers it with TransformerLens's own API at a fresh hook-context level, exactly as
``model.hooks(...)`` does. So while a tl_taskmap context is open:

* ``model.hook_dict[name].fwd_hooks`` lists its hooks (as ``LensHandle`` objects);
* ``model.reset_hooks()`` removes them (the context then removes nothing more on exit);
* a user's ``with model.hooks(...)`` opened inside or outside it nests by context level, as two TL
  contexts do; hook functions receive TL's own ``HookPoint`` (``hook.name``, ``hook.ctx``).

Works on ``HookedTransformer`` (TL 3.x) and ``TransformerBridge`` (TL 3.x and 4.x). On the bridge a
hook name may be an alias of a canonical hook point (``blocks.0.hook_resid_post`` is
``blocks.0.hook_out``); the hook then sees the name it was asked for.

Example:
    >>> from tl_taskmap.hooks import tl_hooks
    >>> with tl_hooks(model, [("blocks.0.hook_resid_post", lambda x, hook: x * 0)]):   # doctest: +SKIP
    ...     print(model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)                # one LensHandle
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import torch

HookFn = Callable[..., Any]
Direction = Literal["fwd", "bwd"]

__all__ = ["tl_hooks", "find_hook_point"]


def find_hook_point(model: Any, name: str, hook_dict: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """The HookPoint called ``name``; an unknown name lists the closest valid ones.

    Example:
        >>> find_hook_point(model, "blocks.0.hook_resid_post")   # doctest: +SKIP
        HookPoint(name='blocks.0.hook_resid_post')
    """
    hooks = model.hook_dict if hook_dict is None else hook_dict
    if name not in hooks:
        close = difflib.get_close_matches(name, list(hooks), n=5, cutoff=0.5)
        hint = f" Closest valid hook names: {close}." if close else ""
        mlp = " This model may lack MLP neuron hooks (mlp.hook_post)." if "mlp" in name else ""
        raise ValueError(f"the model has no hook point {name!r}.{hint}{mlp}")
    return hooks[name]


def _add(point: Any, name: str, fn: HookFn, direction: Direction, level: int) -> Any:
    kwargs: dict[str, Any] = {"dir": direction, "level": level}
    if getattr(point, "name", name) != name:  # a bridge alias: let the hook see the name it asked for
        kwargs["alias_names"] = [name]
    handle = point.add_hook(fn, **kwargs)
    if handle is None:  # TL 3.x returns nothing; the handle is the one just appended
        handle = (point.fwd_hooks if direction == "fwd" else point.bwd_hooks)[-1]
    return handle


def _remove(point: Any, handle: Any, direction: Direction) -> None:
    handle.hook.remove()  # idempotent: fine when the user's reset_hooks() already removed it
    attr = "fwd_hooks" if direction == "fwd" else "bwd_hooks"
    setattr(point, attr, [h for h in getattr(point, attr) if h is not handle])


@contextlib.contextmanager
def tl_hooks(
    model: Any,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    bwd_hooks: Sequence[tuple[str, HookFn]] = (),
) -> Iterator[list[tuple[str, Any]]]:
    """Add TransformerLens hooks for the duration of a ``with`` block, at a new context level.

    Hook functions take ``(activation, hook)`` and may return a replacement, as in TL. All names are
    checked before any hook is added; on exit (also on an exception) exactly the hooks this context
    added are removed and the context level is restored. Yields ``[(name, LensHandle), ...]``.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` (or an object with ``.model``).
        fwd_hooks: ``(hook name, fn)`` pairs run on the forward pass.
        bwd_hooks: ``(hook name, fn)`` pairs run on the backward pass (``fn`` gets the gradient).

    Example:
        >>> with tl_hooks(model, [("blocks.1.mlp.hook_post", lambda x, hook: x.clamp(min=0))]):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    net = getattr(model, "model", model) if not hasattr(model, "hook_dict") else model
    requested = [(n, f, "fwd") for n, f in fwd_hooks] + [(n, f, "bwd") for n, f in bwd_hooks]
    hook_dict = net.hook_dict if requested else {}  # the bridge rebuilds hook_dict per access: read once
    points = [(name, find_hook_point(net, name, hook_dict), fn, direction) for name, fn, direction in requested]
    level = int(getattr(net, "context_level", 0)) + 1
    net.context_level = level
    added: list[tuple[str, Any, Any, Direction]] = []
    try:
        for name, point, fn, direction in points:
            added.append((name, point, _add(point, name, fn, direction, level), direction))  # type: ignore[arg-type]
        yield [(name, handle) for name, _, handle, _ in added]
    finally:
        try:
            for _, point, handle, direction in reversed(added):
                _remove(point, handle, direction)
        finally:
            net.context_level = level - 1
