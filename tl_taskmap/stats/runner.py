"""Compare models layer by layer on tasks: one forward pass per model per batch fills everything.

:func:`compare_models` runs every model once over each batch of a task's prompts, and from that
single pass feeds every CKA accumulator (every model pair × every layer and site), every
covariance spectrum (per model, layer and task), the per-task mean representations (for cross-task
similarity) and a bounded, seeded subsample of per-example representations (for t-SNE plots).
Per-task control models (MOSSA, Zhao et al. 2024: experimental model E vs control C_t fine-tuned on
task t only) run on their own task only, under one shared name (default ``"control"``).
:func:`compare_activations` does the same from activations captured beforehand.

Statistics are accumulated in float64 whatever the model dtype (float16 included); memory is
O(d²) per pair, layer and site for the task being run, whatever the number of examples. Rows with
NaN/inf in any model are dropped from every statistic jointly (never separately per model).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.activations import Reduction, Site, check_finite
from tl_taskmap.driver import Driver
from tl_taskmap.probes import Probe, ProbeBatch
from tl_taskmap.models import SITE_ALIASES, SITE_TEMPLATES, ModelAdapter, PaddingSide, as_adapter
from tl_taskmap.sites import parse_site
from tl_taskmap.tasks import Task, TaskSuite, as_suite

from .cka import StreamingLinearCKA
from .results import ESTIMATORS, FORMAT_VERSION, LayerStats, summarise_cka, summarise_spectrum
from .spectral import StreamingCovariance

__all__ = ["compare_models", "compare_activations"]

Key = tuple[int, str]  # (aligned layer, site kind)
PairSpec = Union[tuple[str, str], str]


# ---------------------------------------------------------------------------- specs
def _kind(name: str) -> str:
    kind = SITE_ALIASES.get(name, name)
    if kind not in SITE_TEMPLATES:
        raise ValueError(f"unknown site {name!r}; compare_models takes site kinds that every model has: "
                         f"{sorted(SITE_TEMPLATES)} (or (layer, kind) pairs, or standard hook names).")
    return kind


def _parse_key(item: Any, default_kind: str) -> Union[Key, tuple[None, str]]:
    """``"resid_post"`` → (None, kind) (all layers); ``(3, "mlp_post")``, ``3``, a Site or a hook name → (layer, kind).

    The form is read by the package's one site parser (:func:`tl_taskmap.sites.parse_site`); here the kind must be
    one every model has.
    """
    layer, kind = parse_site(item, default_kind)
    return layer, _kind(kind)


def _aligned_layers(name: str, adapter: ModelAdapter, mapped: Optional[Sequence[int]]) -> list[int]:
    if mapped is None:
        return list(range(adapter.n_layers))
    layers = [int(x) for x in mapped]
    bad = [x for x in layers if not 0 <= x < adapter.n_layers]
    if bad:
        raise ValueError(f"layer_map[{name!r}] has layers {bad} outside 0..{adapter.n_layers - 1} of that model.")
    return layers


def _model_sites(adapter: ModelAdapter, aligned: list[int], spec: list) -> dict[Key, Site]:
    out: dict[Key, Site] = {}
    for layer, kind in spec:
        for k in range(len(aligned)) if layer is None else ([layer] if 0 <= layer < len(aligned) else []):
            out[(k, kind)] = Site(aligned[k], kind, adapter.hook_name(aligned[k], kind))
    return out


def _resolve_pairs(pairs: Optional[Iterable[PairSpec]], names: list[str], control: Optional[str]) -> list[tuple[str, str]]:
    everyone = names + ([control] if control else [])
    if pairs is None:
        return list(itertools.combinations(names, 2)) + ([(n, control) for n in names] if control else [])
    out: list[tuple[str, str]] = []
    for p in pairs:
        a, b = p.split(" vs ") if isinstance(p, str) else p
        for x in (a, b):
            if x not in everyone:
                raise ValueError(f"pair {p!r} names {x!r}, which is not a model here; models: {everyone}.")
        if (a, b) not in out and (b, a) not in out:
            out.append((a, b))
    return out


def _check_estimators(estimators: Sequence[str]) -> list[str]:
    estimators = [estimators] if isinstance(estimators, str) else list(estimators)
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise ValueError(f"estimators must be a non-empty subset of {ESTIMATORS}, got {estimators}.")
    return estimators


def _check_n(n: int, estimators: Sequence[str], what: str) -> None:
    if n < 2:
        raise ValueError(f"{what} has {n} example(s); CKA and spectra need at least 2.")
    if "debiased" in estimators and n < 4:
        raise ValueError(f"{what} has {n} examples; the debiased CKA estimator needs at least 4 "
                         "(add examples or pass estimators=('biased',)).")


def _as_key_tensors(acts: Any, kind: str, label: str) -> dict[Key, Tensor]:
    """Precomputed activations (Activations, mapping, [layer, n, d] or [n, d] array) → {(layer, kind): [n, d]}."""
    if isinstance(acts, (Tensor, np.ndarray)):
        x = torch.as_tensor(acts)
        if x.ndim == 2:
            return {(0, kind): x}
        if x.ndim == 3:
            return {(i, kind): x[i] for i in range(x.shape[0])}
        raise ValueError(f"{label} must be [n, d] or [layer, n, d], got shape {tuple(x.shape)}.")
    if not isinstance(acts, Mapping):
        raise TypeError(f"{label} must be Activations, a mapping of site → [n, d], or an array; got {type(acts).__name__}.")
    sites = getattr(acts, "sites", None)
    if sites is not None:  # capture's Activations: exact layer and kind per hook name
        return {(s.layer, _kind(s.kind)): torch.as_tensor(acts[s.hook_name]) for s in sites}
    out = {}
    for key, value in acts.items():
        layer, k = _parse_key(key, kind)
        if layer is None:
            raise ValueError(f"{label} key {key!r} names no layer; use (layer, kind), an int layer or a hook name.")
        out[(layer, k)] = torch.as_tensor(value if isinstance(value, Tensor) else np.asarray(value))
    return out


# ---------------------------------------------------------------------------- accumulation
class _TaskAccumulator:
    """Everything accumulated for one task, fed one batch of every model's activations at a time."""

    def __init__(self, task: str, cluster: str, pairs: list[tuple[str, str]], spectra: bool,
                 sample_layers: set[int], sample_index: np.ndarray):
        self.task, self.cluster, self.pairs, self.spectra = task, cluster, pairs, spectra
        self.sample_layers, self.sample_index = sample_layers, sample_index
        self.cka: dict[tuple[str, str, Key], StreamingLinearCKA] = {}
        self.cov: dict[tuple[str, Key], StreamingCovariance] = {}
        self.sums: dict[tuple[str, Key], Tensor] = {}
        self.samples: dict[tuple[str, Key], list[Tensor]] = {}
        self.sampled: list[int] = []
        self.n = self.n_dropped = 0

    def add(self, acts: Mapping[str, Mapping[Key, Float[Tensor, "batch d"]]], start: int) -> None:
        rows = next(iter(next(iter(acts.values())).values())).shape[0]
        keep = torch.ones(rows, dtype=torch.bool)
        for name, per_key in acts.items():
            for (layer, kind), x in per_key.items():
                if x.ndim != 2 or x.shape[0] != rows:
                    raise ValueError(f"{name!r} layer {layer} {kind} gave shape {tuple(x.shape)}, expected [{rows}, d].")
                keep &= torch.isfinite(x).all(1).cpu()
        if not bool(keep.all()):
            self.n_dropped += int((~keep).sum())
            warnings.warn(f"task {self.task!r}: dropped {int((~keep).sum())} example(s) with NaN/inf in some model "
                          "from every statistic (rows stay matched across models).", UserWarning, stacklevel=3)
            acts = {n: {k: x[keep.to(x.device)] for k, x in per_key.items()} for n, per_key in acts.items()}
        index = torch.arange(start, start + rows)[keep].numpy()
        chosen = torch.from_numpy(np.isin(index, self.sample_index))
        self.sampled.extend(index[chosen.numpy()].tolist())
        for a, b in self.pairs:
            for key in acts.get(a, {}):
                if key in acts.get(b, {}):
                    x, y = acts[a][key], acts[b][key]
                    if (a, b, key) not in self.cka:
                        self.cka[(a, b, key)] = StreamingLinearCKA(x.shape[1], y.shape[1])
                    self.cka[(a, b, key)].add(x, y)
        for name, per_key in acts.items():
            for key, x in per_key.items():
                total = x.detach().to(torch.float64).sum(0)
                self.sums[(name, key)] = self.sums[(name, key)] + total if (name, key) in self.sums else total
                if self.spectra:
                    self.cov.setdefault((name, key), StreamingCovariance(x.shape[1])).add(x)
                if key[0] in self.sample_layers and bool(chosen.any()):
                    self.samples.setdefault((name, key), []).append(x[chosen.to(x.device)].detach().float().cpu())
        self.n += int(keep.sum())

    def finish(self, out: dict, estimators: Sequence[str], keep_accumulators: bool) -> None:
        """Reduce to final numbers in ``out`` (the LayerStats fields); the d×d statistics are dropped."""
        t = self.task
        out["tasks"][t] = {"cluster": self.cluster, "n_examples": self.n, "n_dropped": self.n_dropped,
                           "models": sorted({name for name, _ in self.sums}), "sample_index": self.sampled}
        # Each accumulator is dropped once summarised: building its d×d statistics (deferred until now, see
        # SafetensorsState) then costs one accumulator's worth of memory at a time.
        for (a, b, (layer, kind)), acc in _drain(self.cka):
            where = f"task {t!r}, {a} vs {b}, layer {layer} {kind}"
            out["cka"][(t, a, b, kind, layer)] = summarise_cka(acc, estimators, where)
            if keep_accumulators:
                out["accumulators"][("cka", t, a, b, kind, layer)] = StreamingLinearCKA.from_state_dict(acc.state_dict(), "cpu")
        for (name, (layer, kind)), cov in _drain(self.cov):
            where = f"task {t!r}, {name}, layer {layer} {kind}"
            out["spectra"][(t, name, kind, layer)], out["eigenvalues"][(t, name, kind, layer)] = summarise_spectrum(cov, where)
            if keep_accumulators:
                out["accumulators"][("cov", t, name, kind, layer)] = StreamingCovariance.from_state_dict(cov.state_dict(), "cpu")
        for (name, (layer, kind)), total in self.sums.items():
            out["means"][(t, name, kind, layer)] = (total / max(self.n, 1)).cpu()
            out["layers"].setdefault(kind, set()).add(layer)
        for (name, (layer, kind)), parts in self.samples.items():
            out["samples"][(t, name, kind, layer)] = torch.cat(parts)


def _drain(accumulators: dict) -> Iterator[tuple[Any, Any]]:
    """``accumulators.items()`` in order, removing each item from the dict as it is handed out."""
    for key in list(accumulators):
        yield key, accumulators.pop(key)


def _sample_index(n: int, bound: int, seed: int) -> np.ndarray:
    # Seeded by ``seed`` only, so tasks of equal size sample the same example indices (task_cka relies on it).
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, bound), replace=False))


def _embedding_layers(embedding_layers: Union[str, Sequence[int], None], n_aligned: int) -> set[int]:
    if embedding_layers is None:
        return set()
    if isinstance(embedding_layers, str):
        if embedding_layers != "auto":
            raise ValueError(f"embedding_layers must be 'auto', None or a list of layers, got {embedding_layers!r}.")
        return {0, n_aligned // 2, n_aligned - 1}
    return {int(x) % n_aligned for x in embedding_layers}


def _new_output() -> dict:
    return {name: {} for name in ("tasks", "cka", "spectra", "eigenvalues", "means", "samples", "accumulators", "layers")}


def _to_stats(out: dict, models: list[str], pairs: list[tuple[str, str]], keep_accumulators: bool, meta: dict) -> LayerStats:
    layers = {kind: sorted(v) for kind, v in out.pop("layers").items()}
    accumulators = out.pop("accumulators")
    accumulators = accumulators if keep_accumulators else None
    return LayerStats(models=models, pairs=pairs, layers=layers, accumulators=accumulators, meta=meta, **out)


class _LayerStatsProbe(Probe):
    """Feeds one :class:`_TaskAccumulator` per task from the driver's batches (what compare_models fills)."""

    def __init__(self, site_maps: dict[str, dict[Key, Site]], control_maps: dict[int, dict[Key, Site]], reduce: Reduction,
                 pairs: list[tuple[str, str]], spectra: bool, sample_layers: set[int], sample_index: dict[str, np.ndarray],
                 finish: Callable[[_TaskAccumulator], None]):
        self.site_maps, self.control_maps, self.reduce, self.pairs = site_maps, control_maps, reduce, pairs
        self.spectra, self.sample_layers, self.sample_index = spectra, sample_layers, sample_index
        self.finish = finish
        self.tasks_: dict[str, _TaskAccumulator] = {}
        self.finished_: set[str] = set()
        self._keys: dict[str, dict[str, tuple[Key, Site]]] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        site_map = self.site_maps.get(model) or self.control_maps.get(id(adapter), {})
        self._keys[model] = {site.hook_name: (key, site) for key, site in site_map.items()}
        self._dtypes[model] = adapter.dtype
        return [site.hook_name for site in site_map.values()]

    def update(self, batch: ProbeBatch) -> None:
        batch_acts: dict[str, dict[Key, Tensor]] = {}
        for name, acts in batch.acts.items():
            batch_acts[name] = {}
            for hook, x in acts.items():
                key, site = self._keys[name][hook]
                batch_acts[name][key] = reduced = batch.reduce(x, self.reduce)
                check_finite(reduced, site, self._dtypes[name])
        if batch.task not in self.tasks_:
            if batch.task in self.finished_:
                raise RuntimeError(f"task {batch.task!r} came back after its statistics were reduced; the driver runs tasks one at a time")
            # Memory: a task's d×d accumulators (CKA per pair, covariance per model, for every layer) are reduced
            # to numbers as soon as the driver moves on, so only one task's are alive at a time.
            self.finish_all()
            here = [(a, b) for a, b in self.pairs if a in batch_acts and b in batch_acts]
            self.tasks_[batch.task] = _TaskAccumulator(batch.task, batch.cluster, here, self.spectra, self.sample_layers,
                                                       self.sample_index[batch.task])
        self.tasks_[batch.task].add(batch_acts, batch.start)

    def finish_all(self) -> None:
        """Reduce every open task to its numbers (``finish``) and drop its accumulators."""
        for name in list(self.tasks_):
            self.finish(self.tasks_.pop(name))
            self.finished_.add(name)


# ---------------------------------------------------------------------------- public API
def compare_models(
    models: Mapping[str, Any],
    tasks: Union[Task, TaskSuite, Sequence[Task], Mapping[str, Task]],
    *,
    sites: Any = "resid_post",
    reduce: Reduction = "last",
    pairs: Optional[Iterable[PairSpec]] = None,
    control_models: Optional[Mapping[str, Any]] = None,
    control_name: str = "control",
    layer_map: Optional[Mapping[str, Sequence[int]]] = None,
    batch_size: int = 8,
    estimators: Sequence[str] = ESTIMATORS,
    spectra: bool = True,
    embedding_layers: Union[str, Sequence[int], None] = "auto",
    max_samples_per_task: int = 200,
    seed: int = 0,
    keep_accumulators: bool = False,
    progress: bool = True,
    max_examples: Optional[int] = None,
    padding_side: PaddingSide = "left",
    prepend_bos: Optional[bool] = None,
    probes: Sequence[Probe] = (),
) -> LayerStats:
    """CKA between models, spectra, task means and sampled representations, per task and layer.

    Args:
        models: Name → HookedTransformer / TransformerBridge / ModelAdapter (e.g. ``{"sft": ..., "base": ...}``).
            Widths and families may differ; the tokenizer must be shared (checked on every prompt).
        tasks: A Task, TaskSuite, list or mapping of tasks; their ``prompts`` are the inputs.
        sites: Site kind(s) for every aligned layer (``"resid_post"``, ``["resid_post", "mlp_out"]``),
            ``(layer, kind)`` pairs or standard hook names; layers here are aligned layers.
        reduce: Per-example reduction (``"last"`` prompt token as in the paper, ``"mean"``, ...).
        pairs: Model pairs to compare, ``[("sft", "control"), "base vs control"]``; default: all pairs
            of ``models`` plus each model with the control models.
        control_models: Task name → its control model C_t, run on that task only and compared under
            the name ``control_name``. Tasks without one get no control pairs.
        layer_map: Name (or ``control_name``) → the model's layers in aligned order. Default: each
            model's own layers, so a pair compares layer i with layer i wherever both models have it
            (the deeper model's extra layers get spectra but no CKA). E.g. ``{"big": [0, 2, 4, 6]}``
            compares a 4-layer model's layer k with layer 2k of an 8-layer one.
        batch_size: Prompts per forward pass.
        estimators: ``"biased"`` (the paper's) and/or ``"debiased"`` CKA (see ``stats.cka``).
        spectra: Also accumulate covariance spectra (dims for 99% variance, participation ratio).
        embedding_layers: Aligned layers at which to keep sampled per-example vectors for t-SNE:
            ``"auto"`` (first, middle, last), a list, or None.
        max_samples_per_task, seed: At most this many examples per task are sampled (seeded).
        keep_accumulators: Keep the streaming accumulators (CPU) for saving and exact merging.
        max_examples: Use only the first ``max_examples`` prompts of each task.
        probes: Further probes fed from the same forward passes (models named as here, control models
            as ``control_name`` on their own task), e.g. an
            :class:`~tl_taskmap.probes.ActivationProbe` that keeps per-example vectors; read them afterwards.

    Returns:
        A :class:`~tl_taskmap.stats.results.LayerStats`.

    Raises:
        ValueError: models tokenize a prompt differently; a task has < 2 examples (< 4 with the
            debiased estimator); unknown pair, site or control task names.
        FloatingPointError: NaN/inf activations (e.g. float16 overflow), naming the layer.

    Example:
        >>> stats = compare_models({"sft": sft, "base": base}, suite, control_models={"sst2": c_sst2})  # doctest: +SKIP
        >>> stats.cka_curve(("sft", "control"), task="sst2")                                          # doctest: +SKIP
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty mapping of name → model, e.g. {'sft': sft, 'base': base}.")
    estimators = _check_estimators(estimators)
    suite = as_suite(tasks)
    adapters = {str(name): as_adapter(m) for name, m in models.items()}
    if control_name in adapters:
        raise ValueError(f"{control_name!r} is the control models' name; rename that model or pass control_name=.")
    controls = {t: as_adapter(m) for t, m in (control_models or {}).items()}
    unknown = sorted(set(controls) - set(suite.names))
    if unknown:
        raise ValueError(f"control_models has tasks {unknown} that are not among the tasks {suite.names}.")
    layer_map = dict(layer_map or {})
    unknown = sorted(set(layer_map) - set(adapters) - {control_name})
    if unknown:
        raise ValueError(f"layer_map names {unknown}, which are not models ({list(adapters)} or {control_name!r}).")
    single = isinstance(sites, (str, Site)) or (isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[0], int))
    spec = [_parse_key(s, "resid_post") for s in ([sites] if single else sites)]
    site_maps = {n: _model_sites(a, _aligned_layers(n, a, layer_map.get(n)), spec) for n, a in adapters.items()}
    empty = [n for n, m in site_maps.items() if not m]
    if empty:
        raise ValueError(f"models {empty} have none of the requested sites {spec} (layers are aligned layers).")
    control_sites = {t: _model_sites(a, _aligned_layers(control_name, a, layer_map.get(control_name)), spec)
                     for t, a in controls.items()}
    pairs = _resolve_pairs(pairs, list(adapters), control_name if controls else None)
    prompts = {t.name: t.prompts[:max_examples] if max_examples else t.prompts for t in suite}
    for task in suite:
        _check_n(len(prompts[task.name]), estimators if pairs else [], f"task {task.name!r}")
    n_aligned = max(k for site_map in site_maps.values() for k, _ in site_map) + 1
    sample_layers = _embedding_layers(embedding_layers, n_aligned)
    out = _new_output()
    probe = _LayerStatsProbe(site_maps, {id(controls[t]): control_sites[t] for t in controls}, reduce, pairs, spectra, sample_layers,
                             {t: _sample_index(len(p), max_samples_per_task, seed) for t, p in prompts.items()},
                             finish=lambda acc: acc.finish(out, estimators, keep_accumulators))
    # One forward per model per batch; each prompt tokenized once per tokenizer (token ids checked equal).
    Driver(adapters, [probe, *probes], batch_size=batch_size, padding_side=padding_side, prepend_bos=prepend_bos, include_targets=False,
           progress=progress).run(suite, task_models={t: {control_name: c} for t, c in controls.items()}, max_examples=max_examples)
    probe.finish_all()
    meta = {
        "format_version": FORMAT_VERSION, "estimators": estimators, "control_name": control_name,
        "reduce": reduce if isinstance(reduce, (str, int)) else getattr(reduce, "__name__", "callable"),
        "sites": [[layer, kind] for layer, kind in spec], "padding_side": padding_side, "batch_size": batch_size,
        "max_examples": max_examples, "max_samples_per_task": max_samples_per_task, "seed": seed,
        "embedding_layers": sorted(sample_layers),
        "layer_map": {n: sorted({s.layer for s in m.values()}) for n, m in site_maps.items()},
        "models": {n: repr(a) for n, a in adapters.items()}, "control_models": {t: repr(a) for t, a in controls.items()},
    }
    names = list(adapters) + ([control_name] if controls else [])
    return _to_stats(out, names, pairs, keep_accumulators, meta)


def compare_activations(
    acts_a: Any,
    acts_b: Any,
    *more: Any,
    names: Optional[Sequence[str]] = None,
    pairs: Optional[Iterable[PairSpec]] = None,
    task: str = "task",
    cluster: str = "misc",
    kind: str = "resid_post",
    estimators: Sequence[str] = ESTIMATORS,
    spectra: bool = True,
    embedding_layers: Union[str, Sequence[int], None] = "auto",
    max_samples_per_task: int = 200,
    seed: int = 0,
    keep_accumulators: bool = False,
    batch_size: int = 1024,
) -> LayerStats:
    """The statistics of :func:`compare_models` for one task, from activations captured beforehand.

    Each argument is one model's activations on the *same* examples in the same order:
    :class:`~tl_taskmap.activations.Activations`, a mapping ``{(layer, kind) | layer | hook name: [n, d]}``,
    or an array ``[layer, n, d]`` / ``[n, d]`` (site ``kind``). Sites are matched by (layer, kind).
    Combine tasks with :meth:`LayerStats.merge`.

    Raises:
        ValueError: the activation sets hold different numbers of examples (both N are named),
            fewer than 2 examples (4 for the debiased estimator), or no common site.

    Example:
        >>> stats = compare_activations(acts_sft, acts_control, names=("sft", "control"), task="sst2")  # doctest: +SKIP
        >>> stats.cka_curve("sft vs control")                                                         # doctest: +SKIP
    """
    sets = [acts_a, acts_b, *more]
    names = [chr(ord("a") + i) for i in range(len(sets))] if names is None else [str(n) for n in names]
    if len(names) != len(sets) or len(set(names)) != len(names):
        raise ValueError(f"need {len(sets)} distinct names for {len(sets)} activation sets, got {names}.")
    estimators = _check_estimators(estimators)
    tables = {name: _as_key_tensors(acts, kind, f"activations {name!r}") for name, acts in zip(names, sets)}
    sizes = {name: sorted({x.shape[0] for x in table.values()}) for name, table in tables.items()}
    for name, ns in sizes.items():
        if len(ns) != 1:
            raise ValueError(f"activations {name!r} have different numbers of examples across sites: {ns}.")
    if len({ns[0] for ns in sizes.values()}) != 1:
        listed = " but ".join(f"{name!r} has N={ns[0]}" for name, ns in sizes.items())
        raise ValueError(f"mismatched number of examples: {listed}; CKA needs the same examples, row for row.")
    n = sizes[names[0]][0]
    pairs = _resolve_pairs(pairs, names, None)
    if pairs and not any(set(tables[a]) & set(tables[b]) for a, b in pairs):
        raise ValueError(f"no (layer, kind) site is in both sets of any pair; sites: { {k: sorted(t) for k, t in tables.items()} }.")
    _check_n(n, estimators if pairs else [], f"task {task!r}")
    n_aligned = max(layer for table in tables.values() for layer, _ in table) + 1
    sample_layers = _embedding_layers(embedding_layers, n_aligned)
    acc = _TaskAccumulator(task, cluster, pairs, spectra, sample_layers, _sample_index(n, max_samples_per_task, seed))
    for start in range(0, n, batch_size):
        acc.add({name: {k: x[start:start + batch_size] for k, x in table.items()} for name, table in tables.items()}, start)
    out = _new_output()
    acc.finish(out, estimators, keep_accumulators)
    meta = {"format_version": FORMAT_VERSION, "estimators": estimators, "control_name": "control",
            "max_samples_per_task": max_samples_per_task, "seed": seed, "embedding_layers": sorted(sample_layers),
            "source": "compare_activations"}
    return _to_stats(out, names, pairs, keep_accumulators, meta)
