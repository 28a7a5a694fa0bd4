"""One file format for every probe's state: safetensors tensors + a JSON document, versioned, atomic.

A *state* is a flat mapping ``str -> Tensor | JSON value`` (what :meth:`Probe.state_dict` returns).
:func:`split_state` separates it into the tensors and a JSON document; :func:`save_state_file` writes
both to one ``.safetensors`` file (the document and :data:`FORMAT_VERSION` in its header, no pickle)
through a temporary file and a rename, so a crash never leaves half a file.
:mod:`tl_taskmap.distributed` sends the same two parts over collectives.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.safetensors")
    >>> save_state_file(path, "Demo", {"sum": torch.ones(2), "n": 3})
    >>> kind, state = load_state_file(path, "Demo")
    >>> kind, state["n"], state["sum"].tolist()
    ('Demo', 3, [1.0, 1.0])
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

FORMAT_VERSION = 1
_HEADER_KEY = "tl_taskmap.state"

__all__ = ["FORMAT_VERSION", "split_state", "join_state", "save_state_file", "load_state_file"]


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(json document, tensors)`` of a flat state; raises naming a value that is neither.

    Example:
        >>> split_state({"x": torch.zeros(1), "name": "a"})
        ({'name': 'a'}, {'x': tensor([0.])})
    """
    doc: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            continue
        try:
            json.dumps(value, allow_nan=True)
        except TypeError as err:
            raise TypeError(f"state entry {key!r} is a {type(value).__name__}, neither a tensor nor JSON-able "
                            f"({err}); a probe's state_dict must hold tensors and plain data only") from None
        doc[key] = value
    return doc, tensors


def join_state(doc: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The inverse of :func:`split_state`. Example: ``join_state({"n": 1}, {})`` → ``{'n': 1}``."""
    clash = sorted(set(doc) & set(tensors))
    if clash:
        raise ValueError(f"state keys {clash} are both tensors and JSON values")
    return {**doc, **tensors}


def save_state_file(path: Union[str, os.PathLike], kind: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` of a ``kind`` (usually the class name) atomically to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"probe states are saved as safetensors: use a '.safetensors' path, got {path.name!r}")
    doc, tensors = split_state(state)
    header = json.dumps({"kind": kind, "format_version": FORMAT_VERSION, "doc": doc})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_HEADER_KEY: header})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_file(path: Union[str, os.PathLike], kind: Optional[str] = None) -> tuple[str, dict[str, Any]]:
    """``(kind, state)`` from a file written by :func:`save_state_file`, checking kind and version."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(_HEADER_KEY)
        if raw is None:
            raise ValueError(f"{os.fspath(path)} has no {_HEADER_KEY!r} header; it was not written by a tl_taskmap probe")
        header = json.loads(raw)
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{os.fspath(path)} has state format version {header.get('format_version')!r}; "
                             f"this tl_taskmap reads version {FORMAT_VERSION}")
        if kind is not None and header.get("kind") != kind:
            raise ValueError(f"{os.fspath(path)} holds a {header.get('kind')!r} state, not a {kind!r} state")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return header["kind"], join_state(header["doc"], tensors)
