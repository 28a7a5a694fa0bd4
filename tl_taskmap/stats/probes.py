"""Layer statistics as probes: streaming CKA between two models, covariance spectra, task means.

Each keeps one float64 accumulator per task and site, fed by the driver
(:mod:`tl_taskmap.driver`) from the same forward passes as every other probe; all are exact to merge.

Example:
    >>> from tl_taskmap.driver import run_probes
    >>> cka, cov = run_probes({"sft": sft, "base": base}, suite,
    ...                       [CKAProbe(("sft", "base")), CovarianceProbe(model="sft")])   # doctest: +SKIP
    >>> cka.result().head()                                                              # doctest: +SKIP
       task  layer        kind   n  cka_biased  cka_debiased
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from tl_taskmap.models import ModelAdapter
from tl_taskmap.probes import ProbeBatch, Reduction, SiteProbe, add_sum, check_reduce, keyed_state, merge_sums, unkeyed_state
from tl_taskmap.sites import SiteSpec, resolve_sites

from .cka import StreamingLinearCKA
from .results import ESTIMATORS, summarise_cka, summarise_spectrum
from .spectral import StreamingCovariance

__all__ = ["CKAProbe", "CovarianceProbe", "TaskMeanProbe"]


def merge_accumulators(mine: dict[Any, Any], theirs: dict[Any, Any]) -> None:
    """Merge streaming accumulators key by key (in place; a key only ``theirs`` has gets a copy)."""
    for key, acc in theirs.items():
        if key in mine:
            mine[key].merge(acc)
        else:
            mine[key] = type(acc).from_state_dict(acc.state_dict())


class CKAProbe(SiteProbe):
    """Streaming linear CKA between two models at matching sites, per task (float64, exact to merge).

    Args:
        models: The two model names, as given to the driver (``("sft", "base")``).
        sites: Site spec resolved on each model; sites pair up by ``(layer, kind)``.
        reduce: Per-example reduction over prompt tokens (``"last"``, as in Zhao et al.).
        estimators: ``"biased"`` and/or ``"debiased"``.

    ``result()`` is a DataFrame ``task, layer, kind, n, cka_<estimator>...``.

    Example:
        >>> CKAProbe(("sft", "base"), sites=["resid_post", "mlp_out"])
        CKAProbe(models=('sft', 'base'), sites=['resid_post', 'mlp_out'], reduce='last', estimators=('biased', 'debiased'))
    """

    def __init__(self, models: Sequence[str] = ("a", "b"), sites: SiteSpec = "resid_post", reduce: Reduction = "last",
                 estimators: Sequence[str] = ESTIMATORS):
        self.models, self.sites, self.reduce, self.estimators = tuple(models), sites, check_reduce(reduce), tuple(estimators)
        if len(self.models) != 2:
            raise ValueError(f"CKAProbe compares two models, got {self.models}")
        self.acc_: dict[tuple[str, int, str], StreamingLinearCKA] = {}

    def uses(self, model: str) -> bool:
        return model in self.models

    def hook_names(self, model: str, adapter: ModelAdapter) -> list[str]:
        if model not in self.models:
            return []
        sites = resolve_sites(adapter, self.sites)
        self.__dict__.setdefault("site_of_", {}).update({(model, s.hook_name): s for s in sites})
        return [s.hook_name for s in sites]

    def update(self, batch: ProbeBatch) -> None:
        a, b = self.models
        if a not in batch.acts or b not in batch.acts:
            return
        site_of = self.__dict__["site_of_"]
        theirs = {(site_of[(b, h)].layer, site_of[(b, h)].kind): h for h in batch.acts[b]}
        for h, x in batch.acts[a].items():
            key = (site_of[(a, h)].layer, site_of[(a, h)].kind)
            if key not in theirs:
                continue
            xr, yr = batch.reduce(x, self.reduce), batch.reduce(batch.acts[b][theirs[key]], self.reduce)
            acc = self.acc_.setdefault((batch.task, *key), StreamingLinearCKA(xr.shape[-1], yr.shape[-1]))
            acc.add(xr, yr)

    def result(self) -> pd.DataFrame:
        rows = []
        for (task, layer, kind), acc in self.acc_.items():
            values = summarise_cka(acc, self.estimators, f"task {task!r}, {' vs '.join(self.models)}, layer {layer} {kind}")
            rows.append({"task": task, "layer": layer, "kind": kind, "n": acc.n, **{f"cka_{e}": v for e, v in values.items()}})
        return pd.DataFrame(rows).sort_values(["task", "kind", "layer"], ignore_index=True) if rows else pd.DataFrame(rows)

    def merge(self, other: "CKAProbe") -> "CKAProbe":
        self._check_same_kind(other)
        merge_accumulators(self.acc_, other.acc_)
        return self

    def state_dict(self) -> dict[str, Any]:
        return keyed_state({k: acc.state_dict() for k, acc in self.acc_.items()})

    def load_state_dict(self, state: dict[str, Any]) -> "CKAProbe":
        self.acc_ = {(t, int(layer), kind): StreamingLinearCKA.from_state_dict(fields)
                     for (t, layer, kind), fields in unkeyed_state(state).items()}
        return self


class CovarianceProbe(SiteProbe):
    """Streaming covariance spectrum per task, model and site (dims for 99% variance, participation ratio).

    ``result()`` is a DataFrame ``task, model, layer, kind, n, dims_99, participation_ratio``;
    ``eigenvalues(task, model, hook_name)`` gives the spectrum.

    Example:
        >>> CovarianceProbe("resid_post", model="sft")
        CovarianceProbe(sites='resid_post', reduce='last', model='sft')
    """

    def __init__(self, sites: SiteSpec = "resid_post", reduce: Reduction = "last", model: Optional[str] = None):
        self.sites, self.reduce, self.model = sites, check_reduce(reduce), model
        self.acc_: dict[tuple[str, str, str], StreamingCovariance] = {}

    def update(self, batch: ProbeBatch) -> None:
        for model, acts in batch.acts.items():
            for h, x in acts.items():
                xr = batch.reduce(x, self.reduce)
                self.acc_.setdefault((batch.task, model, h), StreamingCovariance(xr.shape[-1])).add(xr)

    def eigenvalues(self, task: str, model: str, hook_name: str) -> Tensor:
        return self.acc_[(task, model, hook_name)].eigenvalues().cpu()

    def result(self) -> pd.DataFrame:
        rows = []
        for (task, model, h), acc in self.acc_.items():
            site = self._site(h)
            values, _ = summarise_spectrum(acc, f"task {task!r}, {model}, {h}")
            rows.append({"task": task, "model": model, "layer": site.layer, "kind": site.kind, "n": acc.n, **values})
        return pd.DataFrame(rows).sort_values(["task", "model", "kind", "layer"], ignore_index=True) if rows else pd.DataFrame(rows)

    def merge(self, other: "CovarianceProbe") -> "CovarianceProbe":
        self._check_same_kind(other)
        merge_accumulators(self.acc_, other.acc_)
        self.__dict__.setdefault("site_of_", {}).update(other.__dict__.get("site_of_", {}))
        return self

    def state_dict(self) -> dict[str, Any]:
        sites = [[s.layer, s.kind, s.hook_name] for s in self.__dict__.get("site_of_", {}).values()]
        return {**keyed_state({k: acc.state_dict() for k, acc in self.acc_.items()}), "sites": sites}

    def load_state_dict(self, state: dict[str, Any]) -> "CovarianceProbe":
        from tl_taskmap.sites import Site

        self.acc_ = {tuple(k): StreamingCovariance.from_state_dict(fields) for k, fields in unkeyed_state(state).items()}
        self.site_of_ = {c: Site(int(a), b, c) for a, b, c in state.get("sites", [])}
        return self


class TaskMeanProbe(SiteProbe):
    """Mean reduced representation per task, model and site (float64 sums; for cross-task similarity).

    ``result()`` is ``{(task, model, hook name): mean [d] (float64)}``.

    Example:
        >>> TaskMeanProbe("resid_post")
        TaskMeanProbe(sites='resid_post', reduce='last', model=None)
    """

    def __init__(self, sites: SiteSpec = "resid_post", reduce: Reduction = "last", model: Optional[str] = None):
        self.sites, self.reduce, self.model = sites, check_reduce(reduce), model
        self.sums_: dict[tuple[str, str, str], Tensor] = {}
        self.n_: dict[tuple[str, str, str], int] = {}

    def update(self, batch: ProbeBatch) -> None:
        for model, acts in batch.acts.items():
            for h, x in acts.items():
                key = (batch.task, model, h)
                total = batch.reduce(x, self.reduce).detach().to("cpu", torch.float64).sum(0)
                add_sum(self.sums_, self.n_, key, total, x.shape[0])

    def result(self) -> dict[tuple[str, str, str], Tensor]:
        return {k: s / self.n_[k] for k, s in self.sums_.items()}

    def merge(self, other: "TaskMeanProbe") -> "TaskMeanProbe":
        self._check_same_kind(other)
        merge_sums(self.sums_, self.n_, other.sums_, other.n_)
        return self

    def state_dict(self) -> dict[str, Any]:
        keys = list(self.sums_)
        return {**keyed_state({k: {"sum": self.sums_[k]} for k in keys}), "n": [self.n_[k] for k in keys]}

    def load_state_dict(self, state: dict[str, Any]) -> "TaskMeanProbe":
        entries = unkeyed_state(state)
        self.sums_ = {k: v["sum"] for k, v in entries.items()}
        self.n_ = {k: int(n) for k, n in zip(entries, state["n"])}
        return self
