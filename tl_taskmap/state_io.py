"""One file format for every probe's state: safetensors tensors + a JSON document, versioned, atomic.

A *state* is a flat mapping ``str -> Tensor | JSON value`` (what :meth:`Probe.state_dict` returns).
:func:`split_state` separates it into the tensors and a JSON document; :func:`save_state_file` writes
both to one ``.safetensors`` file (the document and :data:`FORMAT_VERSION` in its header, no pickle)
through a temporary file and a rename, so a crash never leaves half a file.
:mod:`tl_taskmap.distributed` sends the same two parts over collectives.

:data:`FORMAT_VERSIONS` is the one registry of the versions of the files this package writes; a
module keeps its public constant (``tl_taskmap.stats.results.FORMAT_VERSION``, ...) read from it, and
readers check a file's version with :func:`check_format`, which names the file, the format, the
version found and the one this tl_taskmap reads.

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

#: The version each file format of this package is written in, and the only one read back (bump it here when a
#: format changes). Formats of tl_taskmap.neurons and tl_taskmap.stats.cka keep their own constants for now.
FORMAT_VERSIONS: dict[str, int] = {
    "state": 1,              # probe states (this module)
    "layer_stats": 1,        # tl_taskmap.stats.results.LayerStats
    "activations": 1,        # tl_taskmap.sinks: activation files and folders
    "stage_record": 2,       # tl_taskmap.report.stages: <out>/stages/<stage>.json
    "baseline_examples": 1,  # tl_taskmap.report: baseline_examples.json
    "model_manifest": 1,     # tl_taskmap.embedded: the embedded model's manifest
    "bigbench_manifest": 1,  # tl_taskmap.setup_assets: the extracted BIG-bench tasks' manifest
    "accumulator": 1,        # tl_taskmap.stats.cka / spectral: streaming CKA and covariance states
    "relevance": 1,          # tl_taskmap.neurons.attribution: RelevanceScores files and states
    "unit_set": 1,           # tl_taskmap.neurons.units: NeuronSet / HeadSet files
    "ablation_matrix": 2,    # tl_taskmap.neurons.ablation_effects (2: per-example losses and option scores; 1 still loads)
    "selection_comparison": 1,  # tl_taskmap.neurons.selection_compare: comparison.json
    "control_model": 1,      # tl_taskmap.neurons.masked_training: saved control models
    "continual_learning": 1,  # tl_taskmap.neurons.ncft: ContinualResult files
    "multitask_model": 1,    # tl_taskmap.neurons.multitask: the cached multi-task model
}
FORMAT_VERSION = FORMAT_VERSIONS["state"]
_HEADER_KEY = "tl_taskmap.state"

__all__ = ["FORMAT_VERSION", "FORMAT_VERSIONS", "FormatVersionError", "check_format", "format_matches", "split_state",
           "join_state", "save_state_file", "load_state_file"]


class FormatVersionError(ValueError):
    """A file written in a format version this tl_taskmap does not read."""


def format_matches(kind: str, found: Any) -> bool:
    """Whether ``found`` (an int, or its text as stored in safetensors metadata) is the version of ``kind`` read here.

    Example:
        >>> format_matches("state", 1), format_matches("state", "1"), format_matches("state", None)
        (True, True, False)
    """
    expected = FORMAT_VERSIONS[kind]
    return found == expected or (isinstance(found, str) and found == str(expected))


def check_format(kind: str, found: Any, path: Union[str, os.PathLike, None] = None) -> None:
    """Raise :class:`FormatVersionError` unless ``found`` is the version of format ``kind`` this tl_taskmap reads.

    Example:
        >>> check_format("layer_stats", 1, "r/layers/stats")
        >>> check_format("layer_stats", 99, "r/layers/stats")
        Traceback (most recent call last):
        tl_taskmap.state_io.FormatVersionError: r/layers/stats has layer_stats format version 99; this tl_taskmap reads version 1
    """
    if not format_matches(kind, found):
        where = f"{os.fspath(path)} has" if path is not None else "found"
        raise FormatVersionError(f"{where} {kind} format version {found!r}; this tl_taskmap reads version {FORMAT_VERSIONS[kind]}")


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
        check_format("state", header.get("format_version"), path)
        if kind is not None and header.get("kind") != kind:
            raise ValueError(f"{os.fspath(path)} holds a {header.get('kind')!r} state, not a {kind!r} state")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return header["kind"], join_state(header["doc"], tensors)
