"""Streamed activation capture at TransformerLens hook points, reduced to one vector per example.

Only the hooks asked for are registered, each reduces its activation (last real token, mean over
real tokens, a fixed position, or a callable) inside the hook, and the reduced batch goes straight
to a *sink*: memory, disk, or any accumulator. Memory therefore grows with
``n_examples × n_sites × d``, never with sequence length or with the number of hooks in the model.

Example:
    >>> from tl_taskmap.capture import capture
    >>> acts = capture(model, ["The cat sat", "A dog ran far"], sites="resid_post", reduce="last")  # doctest: +SKIP
    >>> acts["blocks.0.hook_resid_post"].shape                                                     # doctest: +SKIP
    torch.Size([2, 576])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.models import SITE_ALIASES, SITE_TEMPLATES, ModelAdapter, PaddingSide, TokenBatch, as_adapter

FORMAT_VERSION = 1

Reduction = Union[str, int, Callable[[Tensor, TokenBatch], Tensor]]
SiteSpec = Union[str, tuple[int, str], "Site", Sequence[Union[str, tuple[int, str], "Site"]]]


@dataclass(frozen=True, order=True)
class Site:
    """A hook point to capture: its layer, its kind (``"resid_post"``, ``"mlp_post"``, ...) and hook name."""

    layer: int
    kind: str
    hook_name: str

    def __str__(self) -> str:
        return self.hook_name


def resolve_sites(model: Any, sites: SiteSpec) -> list[Site]:
    """Turn a site specification into validated :class:`Site` objects.

    Accepted forms: a short kind for every layer (``"resid_post"``), a full hook name
    (``"blocks.3.mlp.hook_post"``), a ``(layer, kind)`` pair, a :class:`Site`, or a list of these.

    Example:
        >>> resolve_sites(model, [(0, "resid_post"), "blocks.1.mlp.hook_post"])   # doctest: +SKIP
        [Site(layer=0, kind='resid_post', hook_name='blocks.0.hook_resid_post'), Site(layer=1, ...)]
    """
    adapter = as_adapter(model)
    items = [sites] if isinstance(sites, (str, Site)) or (isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[0], int)) else list(sites)
    if not items:
        raise ValueError("no sites given: name at least one, e.g. sites='resid_post' or [(3, 'mlp_post')]")
    out: list[Site] = []
    for item in items:
        if isinstance(item, Site):
            adapter.hook_point(item.hook_name)
            out.append(item)
        elif isinstance(item, tuple):
            layer, kind = item
            name = adapter.hook_name(layer, kind)
            out.append(Site(layer % adapter.n_layers, SITE_ALIASES.get(kind, kind), name))
        elif isinstance(item, str) and (item in SITE_TEMPLATES or item in SITE_ALIASES):
            kind = SITE_ALIASES.get(item, item)
            out.extend(Site(layer, kind, adapter.hook_name(layer, kind)) for layer in range(adapter.n_layers))
        elif isinstance(item, str) and "." not in item:
            adapter.hook_name(0, item)  # not a site kind: raises with the closest valid site names
        elif isinstance(item, str):
            adapter.hook_point(item)  # raises with the closest valid names
            out.append(_site_from_hook_name(item))
        else:
            raise TypeError(f"cannot read a site from {item!r}; use 'resid_post', (layer, 'mlp_post') or a hook name")
    seen: dict[str, Site] = {}
    for site in out:
        seen.setdefault(site.hook_name, site)
    return list(seen.values())


def _site_from_hook_name(name: str) -> Site:
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1
    for kind, template in SITE_TEMPLATES.items():
        if layer >= 0 and template.format(layer=layer) == name:
            return Site(layer, kind, name)
    return Site(layer, "hook", name)


# ---------------------------------------------------------------------------- reductions
def reduce_activations(
    acts: Float[Tensor, "batch pos d"], batch: TokenBatch, reduce: Reduction
) -> Float[Tensor, "batch d"]:
    """Reduce per-token activations to one vector per example, counting real tokens only.

    Args:
        acts: Activations at one hook point.
        batch: The batch they came from (its attention mask says which tokens are real).
        reduce: ``"last"`` (last real token), ``"mean"`` (mean over real tokens), an int position
            among the real tokens (``0`` first, ``-1`` last), or a callable ``(acts, batch) -> [batch, d]``.
    """
    mask = batch.attention_mask.to(acts.device)
    if callable(reduce):
        return reduce(acts, batch)
    if reduce == "last":
        if batch.padding_side == "left":
            return acts[:, -1]
        return acts[torch.arange(acts.shape[0], device=acts.device), batch.last_index.to(acts.device)]
    if reduce == "mean":
        weights = mask.to(acts.dtype).unsqueeze(-1)
        return (acts * weights).sum(1) / weights.sum(1).clamp(min=1)
    if isinstance(reduce, int):
        lengths = mask.sum(1)
        first = (mask.shape[1] - lengths) if batch.padding_side == "left" else torch.zeros_like(lengths)
        offset = torch.full_like(lengths, reduce) if reduce >= 0 else lengths + reduce
        if bool(((offset < 0) | (offset >= lengths)).any()):
            raise ValueError(f"position {reduce} is outside some prompts (shortest has {int(lengths.min())} tokens)")
        return acts[torch.arange(acts.shape[0], device=acts.device), first + offset]
    raise ValueError(f"unknown reduce {reduce!r}: use 'last', 'mean', an int position, or a callable(acts, batch)")


# ---------------------------------------------------------------------------- sinks
class ActivationSink(Protocol):
    """Where reduced batches go. ``start`` once, ``add`` per batch in order, ``finish`` once."""

    def start(self, sites: list[Site], n_examples: int) -> None: ...

    def add(self, acts: Mapping[Site, Tensor], start: int) -> None: ...

    def finish(self) -> Any: ...


class Activations(Mapping[str, Tensor]):
    """Captured activations: one ``[n_examples, d]`` tensor per site, keyed by hook name.

    Index with a hook name, a :class:`Site`, or a ``(layer, kind)`` pair.

    Example:
        >>> acts[(3, "resid_post")].shape    # doctest: +SKIP
        torch.Size([200, 576])
        >>> acts.stack("resid_post").shape   # doctest: +SKIP
        torch.Size([30, 200, 576])
    """

    def __init__(self, tensors: Mapping[Site, Tensor]):
        self._by_name = {site.hook_name: t for site, t in tensors.items()}
        self.sites: list[Site] = list(tensors)

    def _key(self, key: Any) -> str:
        if isinstance(key, Site):
            return key.hook_name
        if isinstance(key, tuple):
            layer, kind = key
            kind = SITE_ALIASES.get(kind, kind)
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
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(f"{path} is not a tl_taskmap activations file of format version {FORMAT_VERSION} (found {meta.get('format_version')})")
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
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} holds format version {index.get('format_version')}, expected {FORMAT_VERSION}")
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


# ---------------------------------------------------------------------------- capture
class Capturer:
    """Runs batches through one model and returns reduced activations at fixed sites.

    The building block of :func:`capture` and of runners that feed several models batch by batch
    (one forward pass per model per batch).

    Example:
        >>> cap = Capturer(model, sites="resid_post", reduce="last")   # doctest: +SKIP
        >>> out = cap.run_batch(["The cat sat", "A dog"])                # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        sites: SiteSpec,
        reduce: Reduction = "last",
        *,
        padding_side: PaddingSide = "left",
        prepend_bos: Optional[bool] = None,
        max_length: Optional[int] = None,
        stop_early: bool = True,
    ):
        self.adapter: ModelAdapter = as_adapter(model)
        self.sites = resolve_sites(self.adapter, sites)
        if not (callable(reduce) or reduce in ("last", "mean") or isinstance(reduce, int)):
            raise ValueError(f"unknown reduce {reduce!r}: use 'last', 'mean', an int position, or a callable(acts, batch)")
        self.reduce = reduce
        self.padding_side: PaddingSide = padding_side
        self.prepend_bos = prepend_bos
        self.max_length = max_length
        self.stop_early = stop_early

    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        return self.adapter.tokenize(prompts, padding_side=self.padding_side, prepend_bos=self.prepend_bos, max_length=self.max_length)

    def run_batch(self, batch: Union[Sequence[str], TokenBatch]) -> dict[Site, Float[Tensor, "batch d"]]:
        """One forward pass; returns ``{site: [batch, d]}`` on the model's device, in the model's dtype."""
        if not isinstance(batch, TokenBatch):
            batch = self.tokenize(batch)
        batch = batch.to(self.adapter.device)
        store: dict[Site, Tensor] = {}

        def make_hook(site: Site) -> Callable[..., None]:
            def hook(acts: Tensor, hook: Any) -> None:
                store[site] = reduce_activations(acts.detach(), batch, self.reduce)

            return hook

        kwargs: dict[str, Any] = {}
        last_layer = max(s.layer for s in self.sites)
        if self.stop_early and 0 <= last_layer < self.adapter.n_layers - 1 and all(s.kind != "hook" for s in self.sites):
            kwargs["stop_at_layer"] = last_layer + 1
        with torch.no_grad(), self.adapter.hooks([(s.hook_name, make_hook(s)) for s in self.sites]):
            self.adapter.forward(batch, **kwargs)
        for site in self.sites:
            if site not in store:
                raise RuntimeError(f"hook {site.hook_name} never fired during the forward pass; this architecture may not run it")
            check_finite(store[site], site, self.adapter.dtype)
        return store


def check_finite(acts: Tensor, site: Site, model_dtype: torch.dtype) -> None:
    """Raise a clear error naming the layer when activations hold NaN or inf."""
    if not bool(torch.isfinite(acts).all()):
        hint = (
            " The model runs in float16, whose range is ±65504: this looks like an fp16 overflow; load it in bfloat16 or float32."
            if model_dtype == torch.float16
            else " Check the model's weights and inputs (a NaN in a weight spreads to every later layer)."
        )
        raise FloatingPointError(f"non-finite (NaN/inf) activations at layer {site.layer} ({site.hook_name}).{hint}")


def check_prompts(adapter: ModelAdapter, prompts: Sequence[str], *, max_length: Optional[int] = None, prepend_bos: Optional[bool] = None) -> None:
    """Fail before any forward pass on a non-string or too-long prompt, naming it."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, expected str")
    limit = max_length or adapter.n_ctx
    if limit is None:
        return
    bos = int(adapter.default_prepend_bos if prepend_bos is None else prepend_bos)
    for i, ids in enumerate(adapter.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]):
        if len(ids) + bos > limit:
            raise ValueError(
                f"prompt {i} is {len(ids) + bos} tokens long, longer than the model's context of {limit} tokens; "
                "shorten it or truncate the task's prompts"
            )


def iter_batches(items: Sequence[Any], batch_size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """``(start, chunk)`` pairs over ``items`` in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield start, items[start : start + batch_size]


def capture(
    model: Any,
    prompts: Sequence[str],
    sites: SiteSpec = "resid_post",
    reduce: Reduction = "last",
    *,
    batch_size: int = 8,
    sink: Optional[ActivationSink] = None,
    padding_side: PaddingSide = "left",
    prepend_bos: Optional[bool] = None,
    max_length: Optional[int] = None,
    progress: bool = True,
) -> Any:
    """Capture reduced activations of ``prompts`` at ``sites``, streamed batch by batch into ``sink``.

    Args:
        model: A HookedTransformer, TransformerBridge or :class:`ModelAdapter`.
        prompts: The inputs (e.g. one task's prompts).
        sites: ``"resid_post"`` (all layers), ``[(3, "mlp_post")]``, hook names, or a list of these.
        reduce: ``"last"`` real token, ``"mean"`` over real tokens, an int position, or a callable.
        batch_size: Prompts per forward pass.
        sink: Where batches go; defaults to :class:`MemorySink` (float32 on CPU). Use
            :class:`DiskSink` for N too large for memory, or an accumulator.
        padding_side: Pad on the ``"left"`` or ``"right"``; results do not depend on it.
        prepend_bos: Prepend BOS (default: the model's setting).
        max_length: Longest prompt allowed (default: the model's context length).
        progress: Show a progress bar.

    Returns:
        Whatever ``sink.finish()`` returns: :class:`Activations` for the memory and disk sinks.

    Only the needed hooks are added, as plain torch handles that are removed on exit (also on an
    exception or KeyboardInterrupt), so it is safe inside a user's own ``model.hooks(...)`` context.

    Example:
        >>> acts = capture(model, prompts, sites=[(0, "resid_post"), (1, "mlp_post")], reduce="mean")  # doctest: +SKIP
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture got no prompts: pass at least one (is the task empty?)")
    capturer = Capturer(model, sites, reduce, padding_side=padding_side, prepend_bos=prepend_bos, max_length=max_length)
    check_prompts(capturer.adapter, prompts, max_length=max_length, prepend_bos=prepend_bos)
    sink = sink if sink is not None else MemorySink()
    sink.start(capturer.sites, len(prompts))
    n_batches = math.ceil(len(prompts) / batch_size)
    for start, chunk in tqdm(iter_batches(prompts, batch_size), total=n_batches, disable=not progress, desc="capture", leave=False):
        sink.add(capturer.run_batch(chunk), start)
    return sink.finish()
