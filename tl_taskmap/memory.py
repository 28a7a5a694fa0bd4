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

__all__ = ["release_memory"]


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
