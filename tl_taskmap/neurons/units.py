"""One immutable set type for every kind of model unit: FFN neurons, attention heads, ...

A unit is ``(layer, index)`` with ``index`` in ``[0, size)``, where ``size`` is the number of units of
that kind per layer (``d_mlp`` neurons, ``n_heads`` heads). :class:`UnitSet` holds the whole
implementation — top-k% selection, set algebra, Jaccard overlap, random sets with matched per-layer
counts, JSON / safetensors I/O — and each unit kind is a thin subclass that names its unit and its
size (:class:`~tl_taskmap.neurons.sets.NeuronSet`, :class:`~tl_taskmap.neurons.sets.HeadSet`). Sets of
different kinds never mix: ``neurons | heads`` is a TypeError, and they are never equal.

Example:
    >>> from tl_taskmap.neurons.sets import HeadSet, NeuronSet
    >>> heads = HeadSet(2, 4, {0: [1], 1: [0, 3]})
    >>> heads.counts_per_layer(), (1, 3) in heads, heads.unit
    ([1, 2], True, 'head')
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_taskmap.state_io import FORMAT_VERSIONS

FORMAT_VERSION = FORMAT_VERSIONS["unit_set"]

S = TypeVar("S", bound="UnitSet")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive integer, got {number}")
    return number


def _json_copy(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a JSON-able dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be a JSON-able dict: {err}") from None


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class UnitSet:
    """An immutable set of units ``(layer, index)`` for a model with ``n_layers`` x ``size`` units.

    Not used directly: subclasses set ``UNIT`` (``"neuron"``), ``SIZE`` (the name of the per-layer
    size, ``"d_mlp"``) and ``COLUMN`` (the index column of :meth:`to_dataframe`). Indices per layer
    are stored sorted and unique (duplicates in the input are dropped); layers not given are empty.
    ``name`` and ``meta`` (a JSON-able dict: task, k, selection mode, ...) travel with the set through
    ``save``/``load`` but are ignored by ``==`` and set algebra, whose results carry no name.

    Example:
        >>> from tl_taskmap.neurons.sets import HeadSet
        >>> a, b = HeadSet(2, 4, {0: [1, 3]}), HeadSet(2, 4, {0: [3], 1: [2]})
        >>> len(a | b), len(a & b), round(a.jaccard(b), 3)
        (3, 1, 0.333)
    """

    UNIT: ClassVar[str] = "unit"
    SIZE: ClassVar[str] = "size"
    COLUMN: ClassVar[str] = "index"

    __slots__ = ("_n_layers", "_size", "_indices", "_name", "_meta")

    def __init__(
        self,
        n_layers: int,
        size: int | None = None,
        indices_by_layer: Mapping[int, Any] | None = None,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        **size_by_name: int,
    ) -> None:
        # The size may also be passed under the kind's own name: NeuronSet(n_layers=2, d_mlp=8), HeadSet(..., n_heads=9).
        unknown = set(size_by_name) - {self.SIZE}
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {sorted(unknown)}")
        if self.SIZE in size_by_name:
            if size is not None:
                raise TypeError(f"{type(self).__name__}() got {self.SIZE} twice (positionally and by name)")
            size = size_by_name[self.SIZE]
        if size is None:
            raise TypeError(f"{type(self).__name__}() missing the per-layer size {self.SIZE}")
        n_layers = _positive_int(n_layers, "n_layers")
        size = _positive_int(size, self.SIZE)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a string or None, got {type(name).__name__}")
        indices = [torch.zeros(0, dtype=torch.int64) for _ in range(n_layers)]
        for key, values in (indices_by_layer or {}).items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise ValueError(f"layer keys must be integers, got {key!r}")
            layer = int(key)
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} is out of range for n_layers={n_layers}")
            indices[layer] = self._as_index_tensor(values, layer, size)
        for attr, value in (
            ("_n_layers", n_layers),
            ("_size", size),
            ("_indices", tuple(indices)),
            ("_name", name),
            ("_meta", _json_copy(meta)),
        ):
            object.__setattr__(self, attr, value)

    @classmethod
    def _as_index_tensor(cls, values: Any, layer: int, size: int) -> Tensor:
        tensor = values.detach().cpu() if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
        if tensor.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(
                f"layer {layer}: {cls.UNIT} indices must be integers, got dtype {tensor.dtype} "
                f"(use {cls.__name__}.from_mask for a boolean mask)"
            )
        if tensor.ndim > 1:
            raise ValueError(f"layer {layer}: {cls.UNIT} indices must be 1-D, got shape {tuple(tensor.shape)}")
        tensor = tensor.reshape(-1).to(torch.int64)
        bad = tensor[(tensor < 0) | (tensor >= size)]
        if bad.numel():
            raise ValueError(f"layer {layer}: {cls.UNIT} index {int(bad[0])} is out of range for {cls.SIZE}={size}")
        return torch.unique(tensor, sorted=True)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one instead")

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def from_mask(
        cls: type[S],
        mask: Bool[Tensor, "n_layers size"],
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> S:
        """Build a set from a boolean mask ``[n_layers, size]``, True where a unit is selected.

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> HeadSet.from_mask(torch.tensor([[True, False], [False, True]])).to_dataframe().values.tolist()
            [[0, 0], [1, 1]]
        """
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.ndim != 2:
            raise ValueError(f"mask must have shape (n_layers, {cls.SIZE}), got {tuple(mask.shape)}")
        mask = mask.detach().cpu()
        rows = {layer: torch.nonzero(mask[layer]).reshape(-1) for layer in range(mask.shape[0])}
        return cls(mask.shape[0], mask.shape[1], rows, name=name, meta=meta)

    @classmethod
    def empty(cls: type[S], n_layers: int, size: int) -> S:
        """The empty set. Example: ``len(HeadSet.empty(2, 4)) == 0``."""
        return cls(n_layers, size)

    @classmethod
    def full(cls: type[S], n_layers: int, size: int) -> S:
        """Every unit of the model. Example: ``len(HeadSet.full(2, 4)) == 8``."""
        return cls.from_mask(torch.ones(n_layers, size, dtype=torch.bool))

    @classmethod
    def top_k(
        cls: type[S],
        scores: Float[Tensor, "n_layers size"],
        fraction: float,
        per_layer: bool = True,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> S:
        """The top ``fraction`` of units by score (top-k% relevance, k=10 -> 0.1).

        ``per_layer=True`` keeps ``round(fraction * size)`` units in every layer; ``per_layer=False``
        keeps ``round(fraction * n_layers * size)`` over the whole model. Rounding is half-up and at
        least one unit is kept. Ties go to the lower ``(layer, index)``, so the result is
        deterministic. ``meta`` records the selection.

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> HeadSet.top_k(torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]]), 0.34).to_dataframe().values.tolist()
            [[0, 1], [1, 0]]
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
            raise ValueError(
                f"fraction must be a number in (0, 1], got {fraction!r}: k is a fraction: 0.1 means top 10%"
            )
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}: k is a fraction: 0.1 means top 10%")
        scores = torch.as_tensor(scores)
        if scores.ndim != 2:
            raise ValueError(f"scores must have shape (n_layers, {cls.SIZE}), got {tuple(scores.shape)}")
        values = scores.detach().cpu().to(torch.float64).numpy()
        nan_layers = np.flatnonzero(np.isnan(values).any(axis=1))
        if nan_layers.size:
            raise ValueError(
                f"scores contain NaN in layer {int(nan_layers[0])} (layers with NaN: {nan_layers.tolist()})"
            )
        n_layers, size = values.shape
        total = size if per_layer else n_layers * size
        k = min(total, max(1, math.floor(fraction * total + 0.5)))
        # Stable sort of the negated scores: higher score first, ties to the lower (layer, index).
        if per_layer:
            order = np.argsort(-values, axis=1, kind="stable")[:, :k]
            chosen = {layer: order[layer] for layer in range(n_layers)}
        else:
            flat = np.argsort(-values.reshape(-1), kind="stable")[:k]
            layers, idx = np.divmod(flat, size)
            chosen = {layer: idx[layers == layer] for layer in range(n_layers)}
        selection = {"selection": "top_k", "fraction": float(fraction), "per_layer": bool(per_layer), "k": int(k)}
        return cls(n_layers, size, chosen, name=name, meta={**selection, **_json_copy(meta)})

    # ----- accessors ----------------------------------------------------------------------

    @property
    def unit(self) -> str:
        """The unit kind, e.g. ``"neuron"`` or ``"head"``."""
        return self.UNIT

    @property
    def n_layers(self) -> int:
        """Number of layers of the model shape."""
        return self._n_layers

    @property
    def units_per_layer(self) -> int:
        """Units per layer of the model shape (``d_mlp`` for neurons, ``n_heads`` for heads)."""
        return self._size

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, units per layer)``."""
        return (self._n_layers, self._size)

    @property
    def name(self) -> str | None:
        """Optional label, e.g. the task name."""
        return self._name

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the JSON-able metadata dict."""
        return json.loads(json.dumps(self._meta))

    def with_name(self: S, name: str | None, meta: Mapping[str, Any] | None = None) -> S:
        """The same units under a new name (and meta, if given). Example: ``s.with_name("sst2")``."""
        return type(self)(*self.shape, self._as_dict(), name=name, meta=self._meta if meta is None else meta)

    def _layer(self, layer: int) -> int:
        layer = operator.index(layer)
        if not 0 <= layer < self._n_layers:
            raise ValueError(f"layer {layer} is out of range for n_layers={self._n_layers}")
        return layer

    def indices(self, layer: int) -> Tensor:
        """Sorted int64 unit indices of ``layer`` (a copy). Example: ``s.indices(0).tolist()``."""
        return self._indices[self._layer(layer)].clone()

    def _as_dict(self) -> dict[int, Tensor]:
        return {layer: idx for layer, idx in enumerate(self._indices) if idx.numel()}

    def counts_per_layer(self) -> list[int]:
        """Number of selected units in each layer, length ``n_layers``."""
        return [int(idx.numel()) for idx in self._indices]

    def layers(self) -> list[int]:
        """Layers holding at least one selected unit."""
        return [layer for layer, idx in enumerate(self._indices) if idx.numel()]

    def to_mask(self) -> Bool[Tensor, "n_layers size"]:
        """Boolean mask of shape ``(n_layers, size)``, True for members."""
        mask = torch.zeros(self._n_layers, self._size, dtype=torch.bool)
        for layer, idx in enumerate(self._indices):
            mask[layer, idx] = True
        return mask

    def __len__(self) -> int:
        return sum(self.counts_per_layer())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for layer, idx in enumerate(self._indices):
            for unit in idx.tolist():
                yield layer, unit

    def __contains__(self, item: object) -> bool:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"test membership with a (layer, {self.UNIT}) pair, got {item!r}")
        layer, unit = (operator.index(v) for v in item)
        if not (0 <= layer < self._n_layers and 0 <= unit < self._size):
            return False
        return bool((self._indices[layer] == unit).any())

    # ----- set algebra --------------------------------------------------------------------

    def check_compatible(self, n_layers: int, size: int | Sequence[int]) -> None:
        """Raise ValueError unless this set fits a model with ``n_layers`` layers of ``size`` units.

        ``size`` may be one int or one size per layer.

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> HeadSet.empty(2, 9).check_compatible(2, 9)
            >>> HeadSet.empty(2, 9).check_compatible(2, 4)
            Traceback (most recent call last):
            ValueError: HeadSet was built for n_heads=9 but the model has n_heads=4 (layer 0)
        """
        kind = type(self).__name__
        if n_layers != self._n_layers:
            raise ValueError(f"{kind} was built for n_layers={self._n_layers} but the model has n_layers={n_layers}")
        sizes = [size] * n_layers if isinstance(size, (int, np.integer)) else list(size)
        if len(sizes) != n_layers:
            raise ValueError(f"got {len(sizes)} {self.SIZE} sizes for a model with n_layers={n_layers}")
        for layer, value in enumerate(sizes):
            if value != self._size:
                raise ValueError(
                    f"{kind} was built for {self.SIZE}={self._size} but the model has {self.SIZE}={value} (layer {layer})"
                )

    def check_fits_model(self, n_layers: int, size: int | Sequence[int], action: str = "use") -> None:
        """:meth:`check_compatible`, with the error naming the set and what could not be done with it.

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> HeadSet.empty(2, 9).check_fits_model(2, 4, "ablate")
            Traceback (most recent call last):
            ValueError: cannot ablate HeadSet on this model: HeadSet was built for n_heads=9 but the model has n_heads=4 (layer 0). Build the set for this model.
        """
        try:
            self.check_compatible(n_layers, size)
        except ValueError as err:
            label = f" {self._name!r}" if self._name else ""
            raise ValueError(f"cannot {action} {type(self).__name__}{label} on this model: {err}. Build the set for this model.") from None

    def _check_same_shape(self: S, other: object) -> S:
        kind = type(self).__name__
        if not isinstance(other, UnitSet) or other.UNIT != self.UNIT:
            raise TypeError(f"expected a {kind}, got {type(other).__name__}: sets of different unit kinds do not combine")
        if other.shape != self.shape:
            raise ValueError(
                f"{kind} shapes differ: (n_layers={self._n_layers}, {self.SIZE}={self._size}) "
                f"vs (n_layers={other._n_layers}, {self.SIZE}={other._size})"
            )
        return other  # type: ignore[return-value]

    def _combine(self: S, other: object, op: Any) -> S:
        other = self._check_same_shape(other)
        return type(self).from_mask(op(self.to_mask(), other.to_mask()))

    def __or__(self: S, other: S) -> S:
        return self._combine(other, operator.or_)

    def __and__(self: S, other: S) -> S:
        return self._combine(other, operator.and_)

    def __sub__(self: S, other: S) -> S:
        return self._combine(other, lambda a, b: a & ~b)

    def __xor__(self: S, other: S) -> S:
        return self._combine(other, operator.xor)

    def __eq__(self, other: object) -> bool:
        # Equality compares unit kind, membership and shape only; anything else is simply unequal.
        if not isinstance(other, UnitSet):
            return NotImplemented
        return self.UNIT == other.UNIT and self.shape == other.shape and all(
            torch.equal(a, b) for a, b in zip(self._indices, other._indices, strict=True)
        )

    def __hash__(self) -> int:
        return hash((self.UNIT, self.shape, tuple(tuple(idx.tolist()) for idx in self._indices)))

    def jaccard(self, other: UnitSet) -> float:
        """Overlap ``|A & B| / |A | B|`` (the paper's overlap rate); 1.0 when both sets are empty.

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> HeadSet(1, 4, {0: [0, 1]}).jaccard(HeadSet(1, 4, {0: [1, 2]}))
            0.3333333333333333
        """
        a, b = self.to_mask(), self._check_same_shape(other).to_mask()
        union = int((a | b).sum())
        return 1.0 if union == 0 else int((a & b).sum()) / union

    def jaccard_per_layer(self, other: UnitSet) -> list[float]:
        """Jaccard overlap per layer; a layer where both sets are empty counts as 1.0 (never NaN).

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> HeadSet(2, 4, {0: [0, 1]}).jaccard_per_layer(HeadSet(2, 4, {0: [1]}))
            [0.5, 1.0]
        """
        a, b = self.to_mask(), self._check_same_shape(other).to_mask()
        inter, union = (a & b).sum(dim=1).tolist(), (a | b).sum(dim=1).tolist()
        return [1.0 if u == 0 else i / u for i, u in zip(inter, union, strict=True)]

    def random_like(self: S, seed: int, *, exclude: UnitSet | None = None) -> S:
        """A random set with exactly this set's per-layer counts (the paper's random baseline).

        Reproducible by ``seed`` through a local ``torch.Generator``; global RNG state is untouched.
        With ``exclude``, units of that set are never drawn (ValueError if a layer has too few left).

        Example:
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> task = HeadSet(2, 9, {0: [1, 2], 1: [7]})
            >>> baseline = task.random_like(seed=0, exclude=task)
            >>> baseline.counts_per_layer(), len(baseline & task)
            ([2, 1], 0)
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        excluded = self._check_same_shape(exclude).to_mask() if exclude is not None else None
        generator = torch.Generator().manual_seed(int(seed))
        drawn = {}
        for layer, count in enumerate(self.counts_per_layer()):
            pool = torch.arange(self._size) if excluded is None else torch.nonzero(~excluded[layer]).reshape(-1)
            if count > pool.numel():
                raise ValueError(
                    f"random_like cannot draw {count} {self.UNIT}s in layer {layer}: exclude leaves only "
                    f"{pool.numel()} of {self.SIZE}={self._size}"
                )
            drawn[layer] = pool[torch.randperm(pool.numel(), generator=generator)[:count]]
        meta = {"selection": "random", "seed": int(seed), "like": self._name, "excluded": exclude is not None}
        return type(self)(*self.shape, drawn, meta=meta)

    # ----- tables and display -------------------------------------------------------------

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per unit, columns ``layer`` and the unit column (int64)."""
        layers = [np.full(idx.numel(), layer, dtype=np.int64) for layer, idx in enumerate(self._indices)]
        units = [idx.numpy() for idx in self._indices]
        return pd.DataFrame({"layer": np.concatenate(layers), self.COLUMN: np.concatenate(units).astype(np.int64)})

    def summary_dataframe(self) -> pd.DataFrame:
        """One row per layer: ``layer``, ``count``, ``fraction`` (count / units per layer)."""
        counts = np.asarray(self.counts_per_layer(), dtype=np.int64)
        return pd.DataFrame(
            {"layer": np.arange(self._n_layers, dtype=np.int64), "count": counts, "fraction": counts / self._size}
        )

    def _repr_html_(self) -> str:  # Jupyter: a compact table and a small figure, see tl_taskmap.display
        from tl_taskmap.display import neuron_set_html

        return neuron_set_html(self)

    def __repr__(self) -> str:
        counts = self.counts_per_layer()
        shown = ", ".join(map(str, counts[:8])) + (", ..." if len(counts) > 8 else "")
        share = 100 * len(self) / (self._n_layers * self._size)
        name = f"name={self._name!r}, " if self._name is not None else ""
        return (
            f"{type(self).__name__}({name}n_layers={self._n_layers}, {self.SIZE}={self._size}, "
            f"total={len(self)} ({share:.1f}%), per_layer=[{shown}])"
        )

    # ----- save / load --------------------------------------------------------------------

    @classmethod
    def _metadata_key(cls) -> str:
        return f"tl_taskmap.{cls.__name__}"

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "n_layers": self._n_layers,
            self.SIZE: self._size,
            "name": self._name,
            "meta": self._meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``.json`` or ``.safetensors`` (chosen by suffix), atomically; no pickle.

        Example:
            >>> import tempfile
            >>> from tl_taskmap.neurons.sets import HeadSet
            >>> s = HeadSet(2, 9, {1: [3]}, name="qqp", meta={"k": 0.1})
            >>> with tempfile.TemporaryDirectory() as d:
            ...     s.save(f"{d}/qqp.json")
            ...     HeadSet.load(f"{d}/qqp.json") == s
            True
        """
        path = Path(path)
        suffix = self._suffix(path)
        if suffix == ".json":
            payload = {**self._header(), "indices": [idx.tolist() for idx in self._indices]}
            _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
        else:
            from safetensors.torch import save_file

            counts = torch.tensor([0, *self.counts_per_layer()], dtype=torch.int64)
            tensors = {"indices": torch.cat(self._indices), "offsets": torch.cumsum(counts, 0)}
            metadata = {self._metadata_key(): json.dumps(self._header())}
            _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls: type[S], path: str | os.PathLike) -> S:
        """Read a set written by :meth:`save`. Example: ``HeadSet.load("sst2_heads.json")``."""
        path = Path(path)
        suffix = cls._suffix(path)
        if suffix == ".json":
            try:
                payload = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            header = cls._check_header(payload, path, extra=("indices",))
            indices = payload["indices"]
            if not isinstance(indices, list) or len(indices) != header["n_layers"]:
                raise ValueError(f"{path}: 'indices' must be a list with one entry per layer ({header['n_layers']})")
            by_layer = dict(enumerate(indices))
        else:
            from safetensors import safe_open

            key = cls._metadata_key()
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get(key)
                if raw is None:
                    raise ValueError(f"{path} has no {key!r} metadata; was it written by {cls.__name__}.save?")
                header = cls._check_header(json.loads(raw), path)
                missing = {"indices", "offsets"} - set(handle.keys())
                if missing:
                    raise ValueError(f"{path} is missing tensor(s): {sorted(missing)}")
                flat, offsets = handle.get_tensor("indices"), handle.get_tensor("offsets").tolist()
            if len(offsets) != header["n_layers"] + 1 or offsets[0] != 0 or offsets[-1] != flat.numel() or any(
                b < a for a, b in zip(offsets, offsets[1:])
            ):
                raise ValueError(f"{path}: 'offsets' do not partition 'indices' into {header['n_layers']} layers")
            by_layer = {layer: flat[offsets[layer] : offsets[layer + 1]] for layer in range(header["n_layers"])}
        return cls(header["n_layers"], header[cls.SIZE], by_layer, name=header["name"], meta=header["meta"])

    @classmethod
    def _suffix(cls, path: Path) -> str:
        suffix = path.suffix.lower()
        if suffix not in (".json", ".safetensors"):
            raise ValueError(f"unknown {cls.__name__} file type {path.suffix!r} for {path}; use .json or .safetensors")
        return suffix

    @classmethod
    def _check_header(cls, header: Any, path: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(header, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(header).__name__}")
        missing = [key for key in ("format_version", "n_layers", cls.SIZE, "name", "meta", *extra) if key not in header]
        if missing:
            other = [k.SIZE for k in _unit_kinds() if k.SIZE in header and k is not cls]
            hint = f" (it holds a {other[0]} field: is it another unit kind's set?)" if other else ""
            raise ValueError(f"{path} is missing field(s): {', '.join(missing)}{hint}")
        if header["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version={header['format_version']!r}; "
                f"this tl_taskmap reads format_version={FORMAT_VERSION}"
            )
        return header


def _unit_kinds() -> list[type[UnitSet]]:
    found, stack = [], list(UnitSet.__subclasses__())
    while stack:
        kind = stack.pop()
        found.append(kind)
        stack.extend(kind.__subclasses__())
    return found
