"""``LayerStats``: the result of a layer-by-layer model comparison, as data.

It holds final numbers, not d×d matrices: per task, model pair, site and layer the CKA values
(each requested estimator); per task, model, site and layer the covariance eigenvalues (hence
dims-for-99% and the participation ratio) and the mean representation; per task a bounded,
seeded subsample of per-example representations at a few layers (for t-SNE/PCA plots). The
streaming accumulators can be kept too (``keep_accumulators=True`` in the runner), so results
computed on shards of the same tasks can be merged exactly later.

Layers are *aligned* layer indices: the model's own block index unless a ``layer_map`` was given
to the runner (see :func:`tl_taskmap.stats.runner.compare_models`). ``blocks.{l}.hook_resid_post``
is layer ``l`` (0-based); it is Hugging Face ``hidden_states[l + 1]``, so the paper's layer ``l + 1``.

Example:
    >>> stats = compare_models({"sft": sft, "base": base}, suite, control_models=controls)  # doctest: +SKIP
    >>> stats.cka_curve(("sft", "control"))          # mean over tasks, one value per layer   # doctest: +SKIP
    >>> stats.sections(tuned="sft", base="base")     # shared / transition / refinement       # doctest: +SKIP
    >>> stats.save("results/cka"); LayerStats.load("results/cka")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.state_io import FORMAT_VERSIONS, check_format

from . import similarity
from .cka import StreamingLinearCKA
from .sections import LayerSections, detect_sections
from .spectral import StreamingCovariance, dims_for_variance_from_eigenvalues

__all__ = ["LayerStats", "FORMAT_VERSION"]

FORMAT_VERSION = FORMAT_VERSIONS["layer_stats"]
ESTIMATORS = ("biased", "debiased")
Pair = Union[tuple[str, str], str]
# (task, model_a, model_b, site kind, layer) and (task, model, site kind, layer)
PairKey = tuple[str, str, str, str, int]
ModelKey = tuple[str, str, str, int]


def summarise_cka(acc: StreamingLinearCKA, estimators: Sequence[str], where: str) -> dict[str, float]:
    """CKA values of one accumulator; an undefined value (e.g. constant features) is NaN plus a warning."""
    out = {}
    for est in estimators:
        try:
            out[est] = acc.cka(debiased=est == "debiased")
        except ValueError as err:
            warnings.warn(f"{where}: {est} CKA is undefined and recorded as NaN: {err}", UserWarning, stacklevel=2)
            out[est] = math.nan
    return out


def summarise_spectrum(cov: StreamingCovariance, where: str) -> tuple[dict[str, float], Tensor]:
    """``({dims_99, participation_ratio}, eigenvalues)``; NaN plus a warning for constant data."""
    eigs = cov.eigenvalues().cpu()
    try:
        return {"dims_99": dims_for_variance_from_eigenvalues(eigs, 0.99),
                "participation_ratio": cov.participation_ratio()}, eigs
    except ValueError as err:
        warnings.warn(f"{where}: spectrum undefined, recorded as NaN: {err}", UserWarning, stacklevel=2)
        return {"dims_99": math.nan, "participation_ratio": math.nan}, eigs


def _nan_to_none(x: float) -> Optional[float]:
    return None if isinstance(x, float) and math.isnan(x) else x


class LayerStats:
    """CKA, spectra, task means and sampled representations per task, model (pair), site and layer.

    Built by :func:`~tl_taskmap.stats.runner.compare_models` or
    :func:`~tl_taskmap.stats.runner.compare_activations`; read it with the methods below or as a
    long table with :meth:`to_dataframe`.

    Example:
        >>> stats.cka_curve(("sft", "control"), estimator="biased")   # doctest: +SKIP
        array([0.97, 0.95, ...])
        >>> stats.to_dataframe().query("statistic == 'cka'").head()   # doctest: +SKIP
    """

    def __init__(self, *, tasks: dict[str, dict], models: list[str], pairs: list[tuple[str, str]],
                 layers: dict[str, list[int]], cka: dict[PairKey, dict[str, float]],
                 spectra: dict[ModelKey, dict[str, float]], eigenvalues: dict[ModelKey, Tensor],
                 means: dict[ModelKey, Tensor], samples: dict[ModelKey, Tensor],
                 accumulators: Optional[dict[tuple, Any]] = None, meta: Optional[dict] = None):
        self.tasks, self.models, self.pairs, self.layers = tasks, list(models), [tuple(p) for p in pairs], layers
        self.cka, self.spectra, self.eigenvalues, self.means, self.samples = cka, spectra, eigenvalues, means, samples
        self.accumulators = accumulators
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ lookup helpers
    @property
    def sites(self) -> list[str]:
        """Site kinds compared (e.g. ``["resid_post"]``)."""
        return list(self.layers)

    @property
    def clusters(self) -> dict[str, str]:
        """Task name → cluster."""
        return {t: info["cluster"] for t, info in self.tasks.items()}

    @property
    def estimators(self) -> list[str]:
        return list(self.meta.get("estimators", ESTIMATORS))

    def _site(self, site: Optional[str]) -> str:
        if site is None:
            return self.sites[0]
        if site not in self.layers:
            raise KeyError(f"site {site!r} was not compared; sites: {self.sites}")
        return site

    def _pair(self, pair: Pair) -> tuple[str, str]:
        a, b = pair.split(" vs ") if isinstance(pair, str) else pair
        for p in self.pairs:
            if p == (a, b) or p == (b, a):
                return p
        raise KeyError(f"pair ({a!r}, {b!r}) was not compared; pairs: {self.pairs}")

    def _model(self, model: Optional[str]) -> str:
        model = self.models[0] if model is None else model
        if model not in self.models:
            raise KeyError(f"no model {model!r}; models: {self.models}")
        return model

    # ------------------------------------------------------------------ CKA
    def cka_by_task(self, pair: Pair, estimator: str = "biased", site: Optional[str] = None) -> pd.DataFrame:
        """CKA of one model pair as a task × layer table (tasks without that pair are left out)."""
        a, b = self._pair(pair)
        site = self._site(site)
        if estimator not in self.estimators:
            raise KeyError(f"estimator {estimator!r} was not computed; estimators: {self.estimators}")
        rows = {}
        for (task, pa, pb, kind, layer), values in self.cka.items():
            if (pa, pb) == (a, b) and kind == site:
                rows.setdefault(task, {})[layer] = values[estimator]
        table = pd.DataFrame.from_dict(rows, orient="index")
        return table.reindex(columns=sorted(table.columns)).rename_axis(index="task", columns="layer")

    def cka_curve(self, pair: Pair, task: Optional[str] = None, estimator: str = "biased",
                  site: Optional[str] = None) -> Float[np.ndarray, " layer"]:
        """CKA per layer for one task, or the mean over the tasks that have the pair (``task=None``).

        The layers are ``cka_by_task(pair).columns``. A NaN (undefined CKA) stays NaN in the mean.
        """
        table = self.cka_by_task(pair, estimator, site)
        if task is not None:
            if task not in table.index:
                raise KeyError(f"task {task!r} has no {self._pair(pair)} CKA; tasks: {list(table.index)}")
            return table.loc[task].to_numpy(dtype=np.float64)
        return table.to_numpy(dtype=np.float64).mean(0)

    def sections(self, tuned: str = "sft", base: Optional[str] = "base", *, against: Optional[str] = None,
                 estimator: str = "biased", site: Optional[str] = None, **kwargs: Any) -> LayerSections:
        """Shared / transition / refinement layers from CKA(tuned, control) vs CKA(base, control).

        ``against`` defaults to the control models' name. Tasks that have both curves are used;
        ``kwargs`` go to :func:`~tl_taskmap.stats.sections.detect_sections` (rule in its docstring).
        """
        against = against or self.meta.get("control_name", "control")
        t = self.cka_by_task((tuned, against), estimator, site)
        if base is None:
            return detect_sections(t.to_numpy(np.float64), layers=list(t.columns), **kwargs)
        b = self.cka_by_task((base, against), estimator, site)
        tasks = [x for x in t.index if x in b.index]
        layers = [x for x in t.columns if x in b.columns]
        if not tasks or not layers:
            raise ValueError(f"no task or layer has both ({tuned}, {against}) and ({base}, {against}) CKA.")
        return detect_sections(t.loc[tasks, layers].to_numpy(np.float64), b.loc[tasks, layers].to_numpy(np.float64),
                               layers=layers, **kwargs)

    # ------------------------------------------------------------------ spectra
    def spectrum_by_task(self, model: str, statistic: str = "dims_99", site: Optional[str] = None) -> pd.DataFrame:
        """``dims_99`` or ``participation_ratio`` of one model as a task × layer table."""
        model, site = self._model(model), self._site(site)
        rows = {}
        for (task, m, kind, layer), values in self.spectra.items():
            if m == model and kind == site:
                rows.setdefault(task, {})[layer] = values[statistic]
        if not rows:
            raise KeyError(f"no spectra for model {model!r} at {site!r} (was spectra=False?)")
        table = pd.DataFrame.from_dict(rows, orient="index")
        return table.reindex(columns=sorted(table.columns)).rename_axis(index="task", columns="layer")

    def dims_for_99(self, model: str, task: Optional[str] = None, site: Optional[str] = None) -> np.ndarray:
        """Dimensions explaining 99% of the variance, per layer (mean over tasks when ``task=None``)."""
        table = self.spectrum_by_task(model, "dims_99", site)
        return table.loc[task].to_numpy(np.float64) if task is not None else table.to_numpy(np.float64).mean(0)

    def dims_for_variance(self, model: str, fraction: float, task: str, site: Optional[str] = None) -> np.ndarray:
        """Dimensions explaining ``fraction`` of the variance per layer, from the stored eigenvalues."""
        model, site = self._model(model), self._site(site)
        return np.array([dims_for_variance_from_eigenvalues(self.eigenvalues[(task, model, site, layer)], fraction)
                         for layer in self.layers[site] if (task, model, site, layer) in self.eigenvalues])

    # ------------------------------------------------------------------ across tasks
    def _per_task(self, store: dict, layer: int, model: Optional[str], site: Optional[str]) -> tuple[list[str], list]:
        model, site = self._model(model), self._site(site)
        names = [t for t in self.tasks if (t, model, site, layer) in store]
        if not names:
            raise KeyError(f"nothing stored for model {model!r}, site {site!r}, layer {layer}; "
                           f"layers with samples: {self.meta.get('embedding_layers')}")
        return names, [store[(t, model, site, layer)] for t in names]

    def task_similarity(self, layer: int, model: Optional[str] = None, site: Optional[str] = None,
                        centre: bool = False) -> pd.DataFrame:
        """Task × task cosine similarity of mean task representations at ``layer``.

        See :func:`~tl_taskmap.stats.similarity.cosine_similarity_matrix` for ``centre``.
        """
        names, vectors = self._per_task(self.means, layer, model, site)
        matrix = similarity.cosine_similarity_matrix(torch.stack(vectors).numpy(), centre=centre)
        return pd.DataFrame(matrix, index=pd.Index(names, name="task"), columns=names)

    def task_cka(self, layer: int, model: Optional[str] = None, site: Optional[str] = None,
                 debiased: bool = False) -> pd.DataFrame:
        """Task × task linear CKA of the stored sampled representations, for tasks with *shared inputs*.

        Valid only when row ``i`` of every task is the same underlying example (the runner samples
        the same indices for tasks of equal size); NaN where the sample sizes differ.
        """
        names, samples = self._per_task(self.samples, layer, model, site)
        matrix = similarity.cross_task_linear_cka([s.numpy() for s in samples], debiased=debiased)
        return pd.DataFrame(matrix, index=pd.Index(names, name="task"), columns=names)

    def embedding(self, layer: int, model: Optional[str] = None, site: Optional[str] = None,
                  method: similarity.EmbeddingMethod = "tsne", seed: int = 0, **kwargs: Any) -> pd.DataFrame:
        """2-D t-SNE (or PCA) coordinates of the sampled per-example representations of all tasks.

        Returns one row per sampled example: ``task, cluster, example, x, y``.
        """
        names, samples = self._per_task(self.samples, layer, model, site)
        coords = similarity.embed_2d(torch.cat(samples).numpy(), method, seed=seed, **kwargs)
        task_col = np.repeat(names, [len(s) for s in samples])
        examples = np.concatenate([np.asarray(self.tasks[t]["sample_index"][: len(s)]) for t, s in zip(names, samples)])
        return pd.DataFrame({"task": task_col, "cluster": [self.tasks[t]["cluster"] for t in task_col],
                             "example": examples, "x": coords[:, 0], "y": coords[:, 1]})

    # ------------------------------------------------------------------ tables
    def to_dataframe(self) -> pd.DataFrame:
        """Long table: ``task, cluster, layer, site, model_pair, model, statistic, estimator, value``.

        CKA rows have ``statistic="cka"``, ``model_pair="a vs b"`` and an ``estimator``; spectrum
        rows have ``statistic`` ``"dims_99"`` or ``"participation_ratio"`` and a ``model``.
        """
        rows = []
        for (task, a, b, kind, layer), values in self.cka.items():
            for est in self.estimators:
                rows.append((task, self.tasks[task]["cluster"], layer, kind, f"{a} vs {b}", None, "cka", est, values[est]))
        for (task, model, kind, layer), values in self.spectra.items():
            for stat, value in values.items():
                rows.append((task, self.tasks[task]["cluster"], layer, kind, None, model, stat, None, value))
        columns = ["task", "cluster", "layer", "site", "model_pair", "model", "statistic", "estimator", "value"]
        return pd.DataFrame(rows, columns=columns)

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import layer_stats_html

        return layer_stats_html(self)

    def __repr__(self) -> str:
        clusters = sorted(set(self.clusters.values()))
        sites = {k: len(v) for k, v in self.layers.items()}
        return (f"LayerStats(tasks={len(self.tasks)}, clusters={clusters}, models={self.models}, "
                f"pairs={[f'{a} vs {b}' for a, b in self.pairs]}, layers_per_site={sites}, "
                f"estimators={self.estimators}, accumulators={'kept' if self.accumulators else 'no'})")

    # ------------------------------------------------------------------ merge
    def merge(self, other: "LayerStats") -> "LayerStats":
        """A new result holding the tasks of both; a task in both is merged exactly.

        Tasks in only one side are copied. A task in both (e.g. two shards of its examples) needs
        the accumulators of both sides (``keep_accumulators=True``): its CKA and spectra are
        recomputed from the merged accumulators, its means weighted by example counts, and its
        samples concatenated (the second shard's indices offset by the first's size) up to the bound.

        Example:
            >>> both = stats_t1.merge(stats_t2)       # doctest: +SKIP
        """
        if set(self.estimators) != set(other.estimators):
            raise ValueError(f"cannot merge results with estimators {self.estimators} and {other.estimators}.")
        shared = set(self.tasks) & set(other.tasks)
        if shared and not (self.accumulators and other.accumulators):
            raise ValueError(f"tasks {sorted(shared)} are in both results; merging them needs the accumulators of "
                             "both (run with keep_accumulators=True, save with accumulators=True).")
        clone = lambda acc: type(acc).from_state_dict(acc.state_dict())  # noqa: E731
        stores = ("cka", "spectra", "eigenvalues", "means", "samples")
        merged = {name: dict(getattr(self, name)) for name in stores}
        for name in stores:
            merged[name].update({k: v for k, v in getattr(other, name).items() if k[0] not in shared})
        accs = None
        if self.accumulators is not None or other.accumulators is not None:
            accs = {k: clone(v) for k, v in (self.accumulators or {}).items()}
            accs.update({k: clone(v) for k, v in (other.accumulators or {}).items() if k[1] not in shared})
        tasks = {**self.tasks, **{t: info for t, info in other.tasks.items() if t not in shared}}
        bound = int(self.meta.get("max_samples_per_task", 200))
        for task in sorted(shared):
            mine, theirs = self.tasks[task], other.tasks[task]
            n_a, n_b = mine["n_examples"], theirs["n_examples"]
            for key, acc in other.accumulators.items():
                if key[1] != task:
                    continue
                if key not in accs:
                    raise ValueError(f"accumulator {key} is only in the second result; both must compare the same models and layers.")
                accs[key].merge(acc)
                where = f"task {task!r} {key[2:]}"
                if key[0] == "cka":
                    merged["cka"][key[1:]] = summarise_cka(accs[key], self.estimators, where)
                else:
                    merged["spectra"][key[1:]], merged["eigenvalues"][key[1:]] = summarise_spectrum(accs[key], where)
            for key, mean in other.means.items():
                if key[0] == task:
                    merged["means"][key] = (n_a * self.means[key] + n_b * mean) / (n_a + n_b)
            for key, sample in other.samples.items():
                if key[0] == task:
                    merged["samples"][key] = torch.cat([self.samples[key], sample])[:bound]
            index = list(mine["sample_index"]) + [i + n_a for i in theirs["sample_index"]]
            tasks[task] = {**mine, "n_examples": n_a + n_b, "n_dropped": mine["n_dropped"] + theirs["n_dropped"],
                           "sample_index": index[:bound]}
        models = self.models + [m for m in other.models if m not in self.models]
        pairs = self.pairs + [p for p in other.pairs if p not in self.pairs]
        layers = {k: sorted(set(self.layers.get(k, [])) | set(other.layers.get(k, []))) for k in {**self.layers, **other.layers}}
        return LayerStats(tasks=tasks, models=models, pairs=pairs, layers=layers, accumulators=accs, meta=self.meta, **merged)

    # ------------------------------------------------------------------ save / load
    def save(self, folder: Union[str, Path], accumulators: Optional[bool] = None) -> Path:
        """Write ``layer_stats.json`` and ``arrays.safetensors`` (and ``accumulators.safetensors``) to ``folder``.

        No pickle. ``accumulators`` defaults to saving them when they were kept.

        Example:
            >>> stats.save("out/cka"); LayerStats.load("out/cka")   # doctest: +SKIP
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        accumulators = bool(self.accumulators) if accumulators is None else accumulators
        if accumulators and not self.accumulators:
            raise ValueError("this result kept no accumulators; run with keep_accumulators=True.")
        version = {"format_version": str(FORMAT_VERSION)}
        tensors, index = {}, {}
        for name in ("eigenvalues", "means", "samples"):
            index[name] = []
            for i, (key, t) in enumerate(getattr(self, name).items()):
                tensors[f"{name}.{i}"] = t.detach().cpu().contiguous()
                index[name].append(list(key))
        save_file(tensors, str(folder / "arrays.safetensors"), metadata=version)
        acc_index = None
        if accumulators:
            acc_index, acc_tensors = [], {}
            for i, (key, acc) in enumerate(self.accumulators.items()):
                acc_index.append(list(key))
                acc_tensors.update({f"{i}.{k}": v.detach().cpu().contiguous() for k, v in acc.state_dict().items()})
            save_file(acc_tensors, str(folder / "accumulators.safetensors"), metadata=version)
        doc = {
            "kind": "LayerStats", "format_version": FORMAT_VERSION, "tasks": self.tasks, "models": self.models,
            "pairs": [list(p) for p in self.pairs], "layers": self.layers, "meta": self.meta,
            "cka": [[*key, {k: _nan_to_none(v) for k, v in values.items()}] for key, values in self.cka.items()],
            "spectra": [[*key, {k: _nan_to_none(v) for k, v in values.items()}] for key, values in self.spectra.items()],
            "arrays": index, "accumulators": acc_index,
        }
        (folder / "layer_stats.json").write_text(json.dumps(doc, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "LayerStats":
        """Read a result written by :meth:`save` (checks the format version)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        doc = json.loads((folder / "layer_stats.json").read_text())
        if doc.get("kind") != "LayerStats":
            raise ValueError(f"{folder} holds a {doc.get('kind')!r}, not a LayerStats.")
        check_format("layer_stats", doc.get("format_version"), folder)

        def key(items: list) -> tuple:
            return (*items[:-1], int(items[-1]))

        def values(d: dict) -> dict:
            return {k: math.nan if v is None else v for k, v in d.items()}

        arrays = load_file(str(folder / "arrays.safetensors"))
        stores = {name: {key(k): arrays[f"{name}.{i}"] for i, k in enumerate(keys)} for name, keys in doc["arrays"].items()}
        accs = None
        if doc.get("accumulators") is not None:
            states: dict[int, dict[str, Tensor]] = {}
            for name, t in load_file(str(folder / "accumulators.safetensors")).items():
                i, stat = name.split(".", 1)
                states.setdefault(int(i), {})[stat] = t
            accs = {key(k): (StreamingLinearCKA if k[0] == "cka" else StreamingCovariance).from_state_dict(states[i])
                    for i, k in enumerate(doc["accumulators"])}
        return cls(tasks=doc["tasks"], models=doc["models"], pairs=[tuple(p) for p in doc["pairs"]],
                   layers={k: [int(x) for x in v] for k, v in doc["layers"].items()},
                   cka={key(r[:-1]): values(r[-1]) for r in doc["cka"]},
                   spectra={key(r[:-1]): values(r[-1]) for r in doc["spectra"]},
                   accumulators=accs, meta=doc["meta"], **stores)
