"""Immutable sets of FFN neurons: top-k% selection, set algebra, Jaccard overlap, random baselines.

A neuron is ``(layer, index)`` with ``index`` in ``[0, d_mlp)`` — the intermediate unit of the MLP
(``mlp.hook_post``), as in Leng & Xiong (2024). Overlap analysis across tasks lives in
:mod:`tl_taskmap.neurons.overlap`.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

FORMAT_VERSION = 1
_REQUIRED_FIELDS = ("format_version", "n_layers", "d_mlp", "name", "meta")


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


def _as_index_tensor(values: Any, layer: int, d_mlp: int) -> Tensor:
    tensor = values.detach().cpu() if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
    if tensor.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(
            f"layer {layer}: neuron indices must be integers, got dtype {tensor.dtype} "
            "(use NeuronSet.from_mask for a boolean mask)"
        )
    if tensor.ndim > 1:
        raise ValueError(f"layer {layer}: neuron indices must be 1-D, got shape {tuple(tensor.shape)}")
    tensor = tensor.reshape(-1).to(torch.int64)
    bad = tensor[(tensor < 0) | (tensor >= d_mlp)]
    if bad.numel():
        raise ValueError(f"layer {layer}: neuron index {int(bad[0])} is out of range for d_mlp={d_mlp}")
    return torch.unique(tensor, sorted=True)


class NeuronSet:
    """An immutable set of FFN neurons ``(layer, index)`` for a model with ``n_layers`` x ``d_mlp``.

    Indices per layer are stored sorted and unique (duplicates in the input are dropped); layers
    not given are empty. ``name`` and ``meta`` (a JSON-able dict: task, k, selection mode, ...)
    travel with the set through ``save``/``load`` but are ignored by ``==`` and set algebra,
    whose results carry no name.

    Example:
        >>> a = NeuronSet(2, 8, {0: [1, 3], 1: [0]}, name="sst2")
        >>> b = NeuronSet(2, 8, {0: [3, 4]})
        >>> len(a | b), len(a & b), (0, 3) in a, a.counts_per_layer()
        (4, 1, True, [2, 1])
        >>> round(a.jaccard(b), 3)
        0.25
    """

    __slots__ = ("_n_layers", "_d_mlp", "_indices", "_name", "_meta")

    def __init__(
        self,
        n_layers: int,
        d_mlp: int,
        indices_by_layer: Mapping[int, Any] | None = None,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        n_layers = _positive_int(n_layers, "n_layers")
        d_mlp = _positive_int(d_mlp, "d_mlp")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a string or None, got {type(name).__name__}")
        indices = [torch.zeros(0, dtype=torch.int64) for _ in range(n_layers)]
        for key, values in (indices_by_layer or {}).items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise ValueError(f"layer keys must be integers, got {key!r}")
            layer = int(key)
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} is out of range for n_layers={n_layers}")
            indices[layer] = _as_index_tensor(values, layer, d_mlp)
        for attr, value in (
            ("_n_layers", n_layers),
            ("_d_mlp", d_mlp),
            ("_indices", tuple(indices)),
            ("_name", name),
            ("_meta", _json_copy(meta)),
        ):
            object.__setattr__(self, attr, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("NeuronSet is immutable; build a new one instead")

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def from_mask(
        cls,
        mask: Bool[Tensor, "n_layers d_mlp"],
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> NeuronSet:
        """Build a set from a boolean mask, True where a neuron is selected.

        Example:
            >>> NeuronSet.from_mask(torch.tensor([[True, False], [False, False]])).to_dataframe().values.tolist()
            [[0, 0]]
        """
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.ndim != 2:
            raise ValueError(f"mask must have shape (n_layers, d_mlp), got {tuple(mask.shape)}")
        mask = mask.detach().cpu()
        rows = {layer: torch.nonzero(mask[layer]).reshape(-1) for layer in range(mask.shape[0])}
        return cls(mask.shape[0], mask.shape[1], rows, name=name, meta=meta)

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int) -> NeuronSet:
        """The empty set. Example: ``len(NeuronSet.empty(2, 8)) == 0``."""
        return cls(n_layers, d_mlp)

    @classmethod
    def full(cls, n_layers: int, d_mlp: int) -> NeuronSet:
        """Every neuron of the model. Example: ``len(NeuronSet.full(2, 8)) == 16``."""
        return cls.from_mask(torch.ones(n_layers, d_mlp, dtype=torch.bool))

    @classmethod
    def top_k(
        cls,
        scores: Float[Tensor, "n_layers d_mlp"],
        fraction: float,
        per_layer: bool = True,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> NeuronSet:
        """The top ``fraction`` of neurons by score (the paper's top-k% relevance, k=10 -> 0.1).

        ``per_layer=True`` keeps ``round(fraction * d_mlp)`` neurons in every layer;
        ``per_layer=False`` keeps ``round(fraction * n_layers * d_mlp)`` over the whole model.
        Rounding is half-up and at least one neuron is kept. Ties go to the lower
        ``(layer, index)``, so the result is deterministic. ``meta`` records the selection.

        Example:
            >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [3.0, 2.0, 1.0, 0.0]])
            >>> NeuronSet.top_k(scores, 0.5).to_dataframe().values.tolist()
            [[0, 1], [0, 2], [1, 0], [1, 1]]
            >>> NeuronSet.top_k(scores, 0.25, per_layer=False).to_dataframe().values.tolist()
            [[1, 0], [1, 1]]
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
            raise ValueError(
                f"fraction must be a number in (0, 1], got {fraction!r}: k is a fraction: 0.1 means top 10%"
            )
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}: k is a fraction: 0.1 means top 10%")
        scores = torch.as_tensor(scores)
        if scores.ndim != 2:
            raise ValueError(f"scores must have shape (n_layers, d_mlp), got {tuple(scores.shape)}")
        values = scores.detach().cpu().to(torch.float64).numpy()
        nan_layers = np.flatnonzero(np.isnan(values).any(axis=1))
        if nan_layers.size:
            raise ValueError(
                f"scores contain NaN in layer {int(nan_layers[0])} (layers with NaN: {nan_layers.tolist()})"
            )
        n_layers, d_mlp = values.shape
        total = d_mlp if per_layer else n_layers * d_mlp
        k = min(total, max(1, math.floor(fraction * total + 0.5)))
        # Stable sort of the negated scores: higher score first, ties to the lower (layer, index).
        if per_layer:
            order = np.argsort(-values, axis=1, kind="stable")[:, :k]
            chosen = {layer: order[layer] for layer in range(n_layers)}
        else:
            flat = np.argsort(-values.reshape(-1), kind="stable")[:k]
            layers, idx = np.divmod(flat, d_mlp)
            chosen = {layer: idx[layers == layer] for layer in range(n_layers)}
        selection = {"selection": "top_k", "fraction": float(fraction), "per_layer": bool(per_layer), "k": int(k)}
        return cls(n_layers, d_mlp, chosen, name=name, meta={**selection, **_json_copy(meta)})

    # ----- accessors ----------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        """Number of layers of the model shape."""
        return self._n_layers

    @property
    def d_mlp(self) -> int:
        """Neurons per layer of the model shape."""
        return self._d_mlp

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, d_mlp)``."""
        return (self._n_layers, self._d_mlp)

    @property
    def name(self) -> str | None:
        """Optional label, e.g. the task name."""
        return self._name

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the JSON-able metadata dict."""
        return json.loads(json.dumps(self._meta))

    def with_name(self, name: str | None, meta: Mapping[str, Any] | None = None) -> NeuronSet:
        """The same neurons under a new name (and meta, if given). Example: ``s.with_name("sst2")``."""
        return NeuronSet(*self.shape, self._as_dict(), name=name, meta=self._meta if meta is None else meta)

    def _layer(self, layer: int) -> int:
        layer = operator.index(layer)
        if not 0 <= layer < self._n_layers:
            raise ValueError(f"layer {layer} is out of range for n_layers={self._n_layers}")
        return layer

    def indices(self, layer: int) -> Tensor:
        """Sorted int64 neuron indices of ``layer`` (a copy). Example: ``s.indices(0).tolist()``."""
        return self._indices[self._layer(layer)].clone()

    def _as_dict(self) -> dict[int, Tensor]:
        return {layer: idx for layer, idx in enumerate(self._indices) if idx.numel()}

    def counts_per_layer(self) -> list[int]:
        """Number of selected neurons in each layer, length ``n_layers``."""
        return [int(idx.numel()) for idx in self._indices]

    def layers(self) -> list[int]:
        """Layers holding at least one selected neuron."""
        return [layer for layer, idx in enumerate(self._indices) if idx.numel()]

    def to_mask(self) -> Bool[Tensor, "n_layers d_mlp"]:
        """Boolean mask of shape ``(n_layers, d_mlp)``, True for members."""
        mask = torch.zeros(self._n_layers, self._d_mlp, dtype=torch.bool)
        for layer, idx in enumerate(self._indices):
            mask[layer, idx] = True
        return mask

    def __len__(self) -> int:
        return sum(self.counts_per_layer())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for layer, idx in enumerate(self._indices):
            for neuron in idx.tolist():
                yield layer, neuron

    def __contains__(self, item: object) -> bool:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"test membership with a (layer, neuron) pair, got {item!r}")
        layer, neuron = (operator.index(v) for v in item)
        if not (0 <= layer < self._n_layers and 0 <= neuron < self._d_mlp):
            return False
        return bool((self._indices[layer] == neuron).any())

    # ----- set algebra --------------------------------------------------------------------

    def check_compatible(self, n_layers: int, d_mlp: int | Sequence[int]) -> None:
        """Raise ValueError unless this set fits a model with ``n_layers`` layers of ``d_mlp`` neurons.

        ``d_mlp`` may be one int or one size per layer.

        Example:
            >>> NeuronSet.empty(2, 8).check_compatible(2, 8)
            >>> NeuronSet.empty(2, 8).check_compatible(2, 4)
            Traceback (most recent call last):
            ValueError: NeuronSet was built for d_mlp=8 but the model has d_mlp=4 (layer 0)
        """
        if n_layers != self._n_layers:
            raise ValueError(f"NeuronSet was built for n_layers={self._n_layers} but the model has n_layers={n_layers}")
        sizes = [d_mlp] * n_layers if isinstance(d_mlp, (int, np.integer)) else list(d_mlp)
        if len(sizes) != n_layers:
            raise ValueError(f"got {len(sizes)} d_mlp sizes for a model with n_layers={n_layers}")
        for layer, size in enumerate(sizes):
            if size != self._d_mlp:
                raise ValueError(
                    f"NeuronSet was built for d_mlp={self._d_mlp} but the model has d_mlp={size} (layer {layer})"
                )

    def _check_same_shape(self, other: object) -> NeuronSet:
        if not isinstance(other, NeuronSet):
            raise TypeError(f"expected a NeuronSet, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(
                f"NeuronSet shapes differ: (n_layers={self._n_layers}, d_mlp={self._d_mlp}) "
                f"vs (n_layers={other._n_layers}, d_mlp={other._d_mlp})"
            )
        return other

    def _combine(self, other: object, op: Any) -> NeuronSet:
        other = self._check_same_shape(other)
        return NeuronSet.from_mask(op(self.to_mask(), other.to_mask()))

    def __or__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, operator.or_)

    def __and__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, operator.and_)

    def __sub__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, lambda a, b: a & ~b)

    def __xor__(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, operator.xor)

    def __eq__(self, other: object) -> bool:
        # Equality compares membership and shape only; sets of other shapes are simply unequal.
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return self.shape == other.shape and all(
            torch.equal(a, b) for a, b in zip(self._indices, other._indices, strict=True)
        )

    def __hash__(self) -> int:
        return hash((self.shape, tuple(tuple(idx.tolist()) for idx in self._indices)))

    def jaccard(self, other: NeuronSet) -> float:
        """Overlap ``|A & B| / |A | B|`` (the paper's overlap rate); 1.0 when both sets are empty.

        Example:
            >>> NeuronSet(1, 4, {0: [0, 1]}).jaccard(NeuronSet(1, 4, {0: [1, 2]}))
            0.3333333333333333
        """
        a, b = self.to_mask(), self._check_same_shape(other).to_mask()
        union = int((a | b).sum())
        return 1.0 if union == 0 else int((a & b).sum()) / union

    def jaccard_per_layer(self, other: NeuronSet) -> list[float]:
        """Jaccard overlap per layer; a layer where both sets are empty counts as 1.0 (never NaN).

        Example:
            >>> NeuronSet(2, 4, {0: [0, 1]}).jaccard_per_layer(NeuronSet(2, 4, {0: [1]}))
            [0.5, 1.0]
        """
        a, b = self.to_mask(), self._check_same_shape(other).to_mask()
        inter, union = (a & b).sum(dim=1).tolist(), (a | b).sum(dim=1).tolist()
        return [1.0 if u == 0 else i / u for i, u in zip(inter, union, strict=True)]

    def random_like(self, seed: int, *, exclude: NeuronSet | None = None) -> NeuronSet:
        """A random set with exactly this set's per-layer counts (the paper's random baseline).

        Reproducible by ``seed`` through a local ``torch.Generator``; global RNG state is untouched.
        With ``exclude``, neurons of that set are never drawn (ValueError if a layer has too few left).

        Example:
            >>> task = NeuronSet(2, 16, {0: [1, 2, 3], 1: [7]})
            >>> baseline = task.random_like(seed=0, exclude=task)
            >>> baseline.counts_per_layer(), len(baseline & task)
            ([3, 1], 0)
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        excluded = self._check_same_shape(exclude).to_mask() if exclude is not None else None
        generator = torch.Generator().manual_seed(int(seed))
        drawn = {}
        for layer, count in enumerate(self.counts_per_layer()):
            pool = torch.arange(self._d_mlp) if excluded is None else torch.nonzero(~excluded[layer]).reshape(-1)
            if count > pool.numel():
                raise ValueError(
                    f"random_like cannot draw {count} neurons in layer {layer}: exclude leaves only "
                    f"{pool.numel()} of d_mlp={self._d_mlp}"
                )
            drawn[layer] = pool[torch.randperm(pool.numel(), generator=generator)[:count]]
        meta = {"selection": "random", "seed": int(seed), "like": self._name, "excluded": exclude is not None}
        return NeuronSet(*self.shape, drawn, meta=meta)

    # ----- tables and display -------------------------------------------------------------

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per neuron, columns ``layer`` and ``neuron`` (int64)."""
        layers = [np.full(idx.numel(), layer, dtype=np.int64) for layer, idx in enumerate(self._indices)]
        neurons = [idx.numpy() for idx in self._indices]
        return pd.DataFrame({"layer": np.concatenate(layers), "neuron": np.concatenate(neurons).astype(np.int64)})

    def summary_dataframe(self) -> pd.DataFrame:
        """One row per layer: ``layer``, ``count``, ``fraction`` (count / d_mlp)."""
        counts = np.asarray(self.counts_per_layer(), dtype=np.int64)
        return pd.DataFrame(
            {"layer": np.arange(self._n_layers, dtype=np.int64), "count": counts, "fraction": counts / self._d_mlp}
        )

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import neuron_set_html

        return neuron_set_html(self)

    def __repr__(self) -> str:
        counts = self.counts_per_layer()
        shown = ", ".join(map(str, counts[:8])) + (", ..." if len(counts) > 8 else "")
        share = 100 * len(self) / (self._n_layers * self._d_mlp)
        name = f"name={self._name!r}, " if self._name is not None else ""
        return (
            f"NeuronSet({name}n_layers={self._n_layers}, d_mlp={self._d_mlp}, "
            f"total={len(self)} ({share:.1f}%), per_layer=[{shown}])"
        )

    # ----- save / load --------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "n_layers": self._n_layers,
            "d_mlp": self._d_mlp,
            "name": self._name,
            "meta": self._meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``.json`` or ``.safetensors`` (chosen by suffix); no pickle.

        Example:
            >>> import tempfile
            >>> s = NeuronSet(2, 8, {1: [3]}, name="qqp", meta={"k": 0.1})
            >>> with tempfile.TemporaryDirectory() as d:
            ...     s.save(f"{d}/qqp.json")
            ...     NeuronSet.load(f"{d}/qqp.json") == s
            True
        """
        path = Path(path)
        suffix = _suffix(path)
        if suffix == ".json":
            payload = {**self._header(), "indices": [idx.tolist() for idx in self._indices]}
            path.write_text(json.dumps(payload, indent=1))
        else:
            from safetensors.torch import save_file

            counts = torch.tensor([0, *self.counts_per_layer()], dtype=torch.int64)
            tensors = {"indices": torch.cat(self._indices), "offsets": torch.cumsum(counts, 0)}
            save_file(tensors, str(path), metadata={"tl_taskmap.NeuronSet": json.dumps(self._header())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronSet:
        """Read a set written by :meth:`save`. Example: ``NeuronSet.load("sst2.safetensors")``."""
        path = Path(path)
        suffix = _suffix(path)
        if suffix == ".json":
            try:
                payload = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            header = _check_header(payload, path, extra=("indices",))
            indices = payload["indices"]
            if not isinstance(indices, list) or len(indices) != header["n_layers"]:
                raise ValueError(f"{path}: 'indices' must be a list with one entry per layer ({header['n_layers']})")
            by_layer = dict(enumerate(indices))
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("tl_taskmap.NeuronSet")
                if raw is None:
                    raise ValueError(
                        f"{path} has no 'tl_taskmap.NeuronSet' metadata; was it written by NeuronSet.save?"
                    )
                header = _check_header(json.loads(raw), path)
                missing = {"indices", "offsets"} - set(handle.keys())
                if missing:
                    raise ValueError(f"{path} is missing tensor(s): {sorted(missing)}")
                flat, offsets = handle.get_tensor("indices"), handle.get_tensor("offsets").tolist()
            if len(offsets) != header["n_layers"] + 1 or offsets[0] != 0 or offsets[-1] != flat.numel() or any(
                b < a for a, b in zip(offsets, offsets[1:])
            ):
                raise ValueError(f"{path}: 'offsets' do not partition 'indices' into {header['n_layers']} layers")
            by_layer = {layer: flat[offsets[layer] : offsets[layer + 1]] for layer in range(header["n_layers"])}
        return cls(header["n_layers"], header["d_mlp"], by_layer, name=header["name"], meta=header["meta"])


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".safetensors"):
        raise ValueError(f"unknown NeuronSet file type {path.suffix!r} for {path}; use .json or .safetensors")
    return suffix


def _check_header(header: Any, path: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(header).__name__}")
    missing = [key for key in (*_REQUIRED_FIELDS, *extra) if key not in header]
    if missing:
        raise ValueError(f"{path} is missing field(s): {', '.join(missing)}")
    if header["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={header['format_version']!r}; "
            f"this tl_taskmap reads format_version={FORMAT_VERSION}"
        )
    return header
