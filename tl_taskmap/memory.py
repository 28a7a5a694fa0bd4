"""Giving freed memory back to the operating system between the stages of a long run.

After a stage, most of what it allocated is garbage: Python frees it, but glibc's allocator keeps the
pages (fragmented heap, per-thread arenas), so the process's resident memory stays at the stage's high
mark and the next stage stacks on top of it. :func:`release_memory` collects garbage and asks glibc to
return free pages (``malloc_trim``); elsewhere (macOS, Windows, musl) it only collects garbage.

Example:
    >>> from tl_taskmap.memory import release_memory
    >>> release_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any, Optional

__all__ = ["release_memory", "freeze_long_lived_objects", "compact"]


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[Any]:
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory() -> bool:
    """``gc.collect()``, then glibc ``malloc_trim(0)`` where there is one; True if memory was trimmed."""
    gc.collect()
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def freeze_long_lived_objects() -> None:
    """Take every object alive now out of the garbage collector's view (``gc.freeze``), for a process that owns its interpreter.

    After the imports of torch, transformers and TransformerLens a process tracks ~450,000 objects
    (modules, classes, functions) that live as long as it does; each full collection walks them all
    (~0.2 s), and :func:`release_memory` runs one after every stage. Frozen, they are skipped, and a
    collection walks only what was made since (models, results): milliseconds. Frozen objects are
    still freed by reference counting; only cycles among them would stay. The command line calls this
    once before a map; a library never should (it would freeze its caller's objects too).
    """
    gc.collect()
    gc.freeze()


def compact(tensor: Any) -> Any:
    """``tensor`` itself if it holds all of its storage, else a copy that does.

    A slice such as the last position of ``[batch, pos, d]`` activations keeps the whole ``[batch, pos, d]``
    storage alive; a result kept across batches must not.

    Example:
        >>> import torch
        >>> acts = torch.zeros(8, 40, 16)
        >>> compact(acts[:, -1]).untyped_storage().nbytes(), compact(acts).untyped_storage().nbytes() == acts.numel() * 4
        (512, True)
    """
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor
