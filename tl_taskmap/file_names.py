"""File names for task names: injective, portable and bounded in length.

Task names become file names (``relevance/<name>.safetensors``, ``neurons/<name>.json``). A plain
character substitution is not injective (``"a b"`` and ``"a_b"`` would share one file, and the
report would compare a task with itself), so a name that is not already a short portable file
name gets a readable stem plus 10 hex digits of the sha256 of the full name.
:func:`check_file_names` refuses the remaining collisions (a name chosen to equal another's
hashed form, or names that differ only in case, which collide on macOS and Windows).

Example:
    >>> safe_name("sentiment")
    'sentiment'
    >>> safe_name("a b") != safe_name("a_b")
    True
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

__all__ = ["safe_name", "check_file_names", "MAX_NAME_CHARS"]

#: Longest file name stem produced (well under the 255-byte limit of common file systems).
MAX_NAME_CHARS = 80
_PORTABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)


def safe_name(name: str) -> str:
    """A file name stem for a task name: the name itself when it is short and portable, else stem + hash.

    Example:
        >>> safe_name("arithmetic/1_digit_addition")
        'arithmetic_1_digit_addition-892dddfbf1'
    """
    if len(name) <= MAX_NAME_CHARS and _PORTABLE.fullmatch(name) and not name.endswith("."):
        return name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name, flags=re.ASCII).strip("_.-")[: MAX_NAME_CHARS - 11] or "task"
    return f"{stem}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def check_file_names(names: Sequence[str]) -> None:
    """Raise ValueError naming the tasks whose file names would collide (case-insensitively).

    Example:
        >>> check_file_names(["a", "A"])
        Traceback (most recent call last):
        ...
        ValueError: task names ['a', 'A'] would share the file name 'a' (names that differ only in case collide on some file systems); rename one of them
    """
    seen: dict[str, str] = {}
    for name in names:
        key = safe_name(name).casefold()
        if key in seen:
            raise ValueError(f"task names {[seen[key], name]} would share the file name {safe_name(seen[key])!r} "
                             f"(names that differ only in case collide on some file systems); rename one of them")
        seen[key] = name
