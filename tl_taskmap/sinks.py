"""Sinks: where captured, reduced batches go (memory, disk, callbacks, accumulators)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.models import SITE_ALIASES
from tl_taskmap.sites import Site, is_site_pair, site_pair
from tl_taskmap.state_io import FORMAT_VERSIONS, check_format

FORMAT_VERSION = FORMAT_VERSIONS["activations"]


class ActivationSink(Protocol):
    """Where reduced batches go. ``start`` once, ``add`` per batch in order, ``finish`` once."""

    def start(self, sites: list[Site], n_examples: int) -> None: ...

    def add(self, acts: Mapping[Site, Tensor], start: int) -> None: ...

    def finish(self) -> Any: ...


class Activations(Mapping[str, Tensor]):
    """Captured activations: one ``[n_examples, d]`` tensor per site, keyed by hook name.

    Index with a hook name, a :class:`Site`, TransformerLens's ``acts["resid_post", 3]`` or a
    ``(layer, kind)`` pair. Negative layers count from the deepest captured layer of that kind
    (``acts["resid_post", -1]`` is the model's last layer when every layer was captured).

    Example:
        >>> acts["resid_post", 3].shape      # doctest: +SKIP
        torch.Size([200, 576])
        >>> acts["resid_post", -1] is acts[(29, "resid_post")]   # doctest: +SKIP
        True
        >>> acts.stack("resid_post").shape   # doctest: +SKIP
        torch.Size([30, 200, 576])
    """

    def __init__(self, tensors: Mapping[Site, Tensor]):
        self._by_name = {site.hook_name: t for site, t in tensors.items()}
        self.sites: list[Site] = list(tensors)

    def _key(self, key: Any) -> str:
        if isinstance(key, Site):
            return key.hook_name
        if is_site_pair(key):
            layer, kind = site_pair(key)
            kind = SITE_ALIASES.get(kind, kind)
            if layer < 0:
                layers = [s.layer for s in self.sites if s.kind == kind]
                layer += max(layers) + 1 if layers else 0
            for site in self.sites:
                if site.layer == layer and site.kind == kind:
                    return site.hook_name
            raise KeyError(f"no captured site {key}; captured: {[s.hook_name for s in self.sites]}")
        return key

    def __getitem__(self, key: Any) -> Tensor:
        return self._by_name[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def n_examples(self) -> int:
        return next(iter(self._by_name.values())).shape[0] if self._by_name else 0

    def stack(self, kind: str) -> Float[Tensor, "layer n d"]:
        """All layers of one kind stacked in layer order."""
        kind = SITE_ALIASES.get(kind, kind)
        chosen = sorted(s for s in self.sites if s.kind == kind)
        if not chosen:
            raise KeyError(f"no captured sites of kind {kind!r}; kinds captured: {sorted({s.kind for s in self.sites})}")
        return torch.stack([self._by_name[s.hook_name] for s in chosen])

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import activations_html

        return activations_html(self)

    def __repr__(self) -> str:
        kinds = sorted({s.kind for s in self.sites})
        width = {s.kind: self._by_name[s.hook_name].shape[-1] for s in self.sites}
        return f"Activations(n_examples={self.n_examples}, sites={len(self.sites)}, kinds={kinds}, widths={width})"

    def save(self, path: str | Path) -> None:
        """Save as safetensors with the sites and a format version in the header (no pickle)."""
        from safetensors.torch import save_file

        meta = {"format_version": str(FORMAT_VERSION), "sites": json.dumps([[s.layer, s.kind, s.hook_name] for s in self.sites])}
        save_file({k: v.contiguous() for k, v in self._by_name.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Activations":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            check_format("activations", meta.get("format_version"), path)
            sites = [Site(int(a), b, c) for a, b, c in json.loads(meta["sites"])]
            return cls({s: f.get_tensor(s.hook_name) for s in sites})


class MemorySink:
    """Keep reduced activations in (CPU) memory, preallocated: ``n_examples × d`` per site."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dtype, self.device = dtype, torch.device(device)
        self._store: dict[Site, Tensor] = {}

    def start(self, sites: list[Site], n_examples: int) -> None:
        self._n = n_examples
        self._store = {}

    def add(self, acts: Mapping[Site, Tensor], start: int) -> None:
        for site, t in acts.items():
            if site not in self._store:
                self._store[site] = torch.empty((self._n, t.shape[-1]), dtype=self.dtype, device=self.device)
            self._store[site][start : start + t.shape[0]] = t.to(self.device, self.dtype)

    def finish(self) -> Activations:
        return Activations(self._store)


class DiskSink:
    """Write reduced activations to ``.npy`` memory-mapped files in ``folder``, one per site.

    For N too large for memory. The result is an :class:`Activations` whose tensors are backed by
    the files (opened read-only), plus an ``index.json`` describing them.
    """

    def __init__(self, folder: str | Path, dtype: np.dtype = np.float32):
        self.folder, self.dtype = Path(folder), np.dtype(dtype)
        self._files: dict[Site, np.memmap] = {}

    def start(self, sites: list[Site], n_examples: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._n, self._sites, self._files = n_examples, sites, {}

    def add(self, acts: Mapping[Site, Tensor], start: int) -> None:
        for site, t in acts.items():
            if site not in self._files:
                path = self.folder / f"{site.hook_name}.npy"
                self._files[site] = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(self._n, t.shape[-1]))
            self._files[site][start : start + t.shape[0]] = t.detach().float().cpu().numpy()

    def finish(self) -> Activations:
        index = {"format_version": FORMAT_VERSION, "n_examples": self._n, "sites": [[s.layer, s.kind, s.hook_name] for s in self._files]}
        for mm in self._files.values():
            mm.flush()
        (self.folder / "index.json").write_text(json.dumps(index, indent=1))
        return load_disk_activations(self.folder)


def load_disk_activations(folder: str | Path) -> Activations:
    """Open activations written by :class:`DiskSink` (memory-mapped, read-only)."""
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    check_format("activations", index.get("format_version"), folder)
    sites = [Site(int(a), b, c) for a, b, c in index["sites"]]
    return Activations({s: torch.from_numpy(np.load(folder / f"{s.hook_name}.npy", mmap_mode="r")) for s in sites})


class CallbackSink:
    """Hand every reduced batch to ``fn(acts_by_site, start)``; ``finish`` returns ``result()`` if given."""

    def __init__(self, fn: Callable[[Mapping[Site, Tensor], int], None], result: Optional[Callable[[], Any]] = None):
        self.fn, self.result = fn, result

    def start(self, sites: list[Site], n_examples: int) -> None:
        pass

    def add(self, acts: Mapping[Site, Tensor], start: int) -> None:
        self.fn(acts, start)

    def finish(self) -> Any:
        return self.result() if self.result else None


class AccumulatorSink:
    """Feed each site's reduced batches to its own accumulator (anything with ``add(x)``).

    ``factory(site, d)`` makes the accumulator for a site of width ``d``; ``finish`` returns
    ``{hook_name: accumulator}``.

    Example:
        >>> from tl_taskmap.stats import StreamingCovariance
        >>> spectra = capture(model, prompts, "resid_post",
        ...                   sink=AccumulatorSink(lambda site, d: StreamingCovariance(d)))   # doctest: +SKIP
        >>> spectra["blocks.0.hook_resid_post"].dims_for_variance(0.99)                     # doctest: +SKIP
    """

    def __init__(self, factory: Callable[[Site, int], Any]):
        self.factory = factory
        self.accumulators: dict[Site, Any] = {}

    def start(self, sites: list[Site], n_examples: int) -> None:
        self.accumulators = {}

    def add(self, acts: Mapping[Site, Tensor], start: int) -> None:
        for site, t in acts.items():
            if site not in self.accumulators:
                self.accumulators[site] = self.factory(site, t.shape[-1])
            self.accumulators[site].add(t)

    def finish(self) -> dict[str, Any]:
        return {site.hook_name: acc for site, acc in self.accumulators.items()}
