"""The one-command task map: baseline → task neurons → layer map → ablation → ``report.html``.

:func:`map_model` runs every stage on one model and a task suite and writes an output folder:

* ``report.html`` — self-contained (figures embedded as base64 PNG, inline CSS, no scripts, no
  network) — and the same figures as ``figures/*.png``; ``config.json``, the exact
  :class:`~tl_taskmap.report.config.MapConfig` (``tl-taskmap map --config config.json`` repeats the run);
* results as data: ``baseline.csv`` (with the exact above-chance test), ``baseline_examples.json``
  (per-example scores, answer losses, option scores); ``relevance/<task>.safetensors`` and ``relevance_by_layer.csv``;
  ``neurons/<task>.json`` with ``jaccard*.csv``, ``overlap_sweep.csv``, ``parameter_similarity.csv``;
  ``layers/`` (:class:`~tl_taskmap.stats.results.LayerStats` as JSON + safetensors, ``layer_stats.csv``,
  ``controls.json``); ``ablation/matrix.json`` with ``cells.csv``, ``delta_table.csv``, ``specificity.csv``;
  ``heads/`` (attention heads as units, :mod:`tl_taskmap.report.heads`; off with ``heads=False``);
  ``selection/`` (the selection-method comparison: ``comparison.csv``, ``summary.csv``, ``comparison.json``
  with the verdict, ``matrix_<method>.json``);
* every path above is spelled once, in :class:`~tl_taskmap.report.layout.ReportLayout`;
* ``stages/<stage>.json``: what each stage depended on (a hash of those configuration fields,
  the task contents, the model's content and upstream stages), its files with their sha256 and how
  long it took; ``stages/current_config.json``: the configuration of the latest run, finished or not
  (``config.json`` is written with ``report.html``, at the end).

A re-run with the same configuration reuses every stage whose record matches and whose files still
have the sha256 in its record (see :mod:`tl_taskmap.report.stages`; a second run on the same folder is refused),
and loads a model only if some stage has to run; changing ``k`` re-runs the neuron and ablation
stages only. Selection and measurement use different examples: each task is split in half
(seeded); relevance, neuron sets and control models use the *selection* half and every reported
number (baseline, CKA, spectra, ablation) is measured on the held-out *evaluation* half.

Checking the HTML by hand: open ``report.html`` in a browser with the network off, or render it
headless and look at the screenshot::

    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \\
        --disable-component-update --disable-sync --no-first-run \\
        --screenshot=shot.png --window-size=1200,6000 file://$PWD/taskmap-report/report.html

(``tests/test_report.py`` does this when ``/usr/bin/chromium`` exists.)

Under ``torchrun`` (``torchrun --nproc_per_node=N -m tl_taskmap map ...``) the relevance and
layer-map stages run sharded over the ranks (:mod:`tl_taskmap.distributed`), trained control models
are copied from rank 0 to every rank, the other stages run on every rank, and only rank 0 writes
the output folder; ``--device cuda`` becomes each rank's own GPU.

Example:
    >>> from tl_taskmap.report import MapConfig, map_model
    >>> result = map_model(MapConfig(out="taskmap-report"))   # doctest: +SKIP
    >>> result.html, result.seconds                           # doctest: +SKIP
    (PosixPath('taskmap-report/report.html'), 212.4)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tl_taskmap import distributed
from tl_taskmap.memory import release_memory
from tl_taskmap.report.config import ConfigError, MapConfig, load_suite
from tl_taskmap.file_names import check_file_names, safe_name
from tl_taskmap.report.layout import ReportLayout
from tl_taskmap.state_io import FORMAT_VERSIONS
from tl_taskmap.report.stages import StageSpec, StageStore, check_stage_order, maybe_lock, write_ablation, write_json_atomic

__all__ = ["MapConfig", "ConfigError", "ReportResult", "StageStore", "map_model", "safe_name"]

from tl_taskmap.report.labels import CONTROL_LABEL, MODEL_LABEL, SECOND_LABEL  # noqa: E402  (re-exported)


def _fingerprint(suite: Any) -> str:
    payload = [(t.name, t.cluster, t.metric, [(e.prompt, e.target, e.options) for e in t.examples]) for t in suite]
    return hashlib.sha256(json.dumps(payload, default=list).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- the run
class _Run:
    """One run's state: configuration, tasks, lazily loaded models, output paths.

    Results are read from ``out``; they are written under ``write_root``, which is ``out`` on rank 0
    and a scratch folder on the other ranks of a torchrun job (their results are the same).
    """

    def __init__(self, config: MapConfig, tasks: Any, log: Callable[[str], None], progress: bool, device: str):
        self.config, self.log, self.progress, self.device = config, log, progress, device
        self.out = Path(config.out).expanduser()
        self.sharded = distributed.world_size() > 1
        self.write_root = self.out if distributed.is_main_process() else Path(tempfile.mkdtemp(prefix=f"tl_taskmap_rank{distributed.rank()}_"))
        self.selection, self.evaluation = load_suite(config, tasks)
        from tl_taskmap.task_spec import row_notes

        for note in row_notes(self.selection, self.evaluation, config.examples):  # --examples never drops rows silently
            log(f"[tasks] {note}")
        self.model_seconds = 0.0

    def _load(self, source: Optional[str], what: str) -> Any:
        import torch

        from tl_taskmap.embedded import load_default_model, load_model

        start = time.perf_counter()
        dtype = getattr(torch, self.config.dtype)
        try:
            model = load_default_model(self.device, dtype) if source is None else load_model(source, self.device, dtype)
        except Exception as err:  # a local folder that does not boot: say which and why (the hub and the embedded model raise as is)
            if source is None or not Path(source).expanduser().is_dir():
                raise
            raise ConfigError(f"{what} at {source} cannot be loaded ({type(err).__name__}: {str(err)[:300]}); check that the folder "
                              f"holds a complete Hugging Face model (config.json and weights); --debug shows the traceback") from err
        self.model_seconds += time.perf_counter() - start
        self.log(f"loaded {what} ({source or 'embedded SmolLM2-135M-Instruct'}) in {time.perf_counter() - start:.0f} s")
        return model

    @functools.cached_property
    def model(self) -> Any:
        return self._load(self.config.model, "the model")

    @functools.cached_property
    def second(self) -> Any:
        return self._load(self.config.second_model, "the second model") if self.config.second_model else None

    def models(self) -> dict[str, Any]:
        return {MODEL_LABEL: self.model, **({SECOND_LABEL: self.second} if self.config.second_model else {})}

    @property
    def layout(self) -> ReportLayout:
        """Where to write: the layout of ``write_root`` (a stage's staging folder while it computes)."""
        return ReportLayout(self.write_root)

    @property
    def results(self) -> ReportLayout:
        """Where to read finished stages' results: the layout of ``out``."""
        return ReportLayout(self.out)

    def path(self, path: Path) -> Path:
        """``path`` (from :attr:`layout`) with its parent folder created."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def folder(self, path: Path) -> Path:
        """The folder ``path`` (from :attr:`layout`), created."""
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rel(self, path: Path) -> str:
        return self.layout.rel(path)

    @contextlib.contextmanager
    def writing_into(self, folder: Path) -> Iterator[None]:
        """Within the block, stage files are written under ``folder`` (a stage's staging folder), not ``write_root``."""
        saved, self.write_root = self.write_root, folder
        try:
            yield
        finally:
            self.write_root = saved

    def baseline_scores(self) -> dict[str, Any]:
        """The finished baseline stage's scores of the model per evaluation task (:func:`load_baseline_scores`)."""
        return load_baseline_scores(self.out, self.evaluation)

    def bar(self, items: Sequence[Any], desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not (self.progress and distributed.is_main_process()), leave=False)


def _baseline(run: _Run) -> tuple[list[str], dict]:
    import pandas as pd

    from tl_taskmap.evaluate import evaluate_task
    from tl_taskmap.stats.inference import above_chance_table

    rows, examples = [], []
    for label, model in run.models().items():
        for task in run.bar(list(run.evaluation), f"baseline ({label})"):
            score = evaluate_task(model, task, batch_size=run.config.batch_size)
            rows.append({"model": label, "cluster": task.cluster, **score.to_dict()})
            examples.append({"model": label, "task": task.name, "per_example": score.per_example, "losses": score.losses,
                             "option_scores": score.option_scores, "predictions": score.predictions})
    path = run.path(run.layout.baseline)
    # Exact one-sided binomial test against chance per task, Holm-adjusted over each model's tasks.
    above_chance_table(pd.DataFrame(rows), by="model").to_csv(path, index=False)
    per_example = run.path(run.layout.baseline_examples)
    tmp = per_example.with_name(f".{per_example.name}.tmp")
    tmp.write_text(json.dumps({"format": "tl_taskmap.BaselineExamples", "format_version": FORMAT_VERSIONS["baseline_examples"], "scores": examples}))
    tmp.replace(per_example)
    return [run.rel(path), run.rel(per_example)], {}


def _relevance(run: _Run) -> tuple[list[str], dict]:
    import pandas as pd

    from tl_taskmap.neurons.attribution import relevance

    files, rows = [], []
    if run.sharded:  # each rank takes a share of every task's examples; the sums are merged exactly
        from tl_taskmap.distributed import distributed_relevance

        merged = distributed_relevance(run.model, run.selection, batch_size=run.config.gradient_batch_size, progress=run.progress)
    for task in run.bar(list(run.selection), "relevance"):
        rel = merged[task.name] if run.sharded else relevance(run.model, task, batch_size=run.config.gradient_batch_size)
        path = run.path(run.layout.relevance(task.name))
        rel.save(path)
        files.append(run.rel(path))
        per_layer = rel.scores.sum(1)
        for layer, value in enumerate((per_layer / per_layer.sum()).tolist()):
            rows.append({"task": task.name, "cluster": task.cluster, "layer": layer, "relevance_share": value})
    path = run.path(run.layout.relevance_by_layer)
    pd.DataFrame(rows).to_csv(path, index=False)
    return files + [run.rel(path)], {}


def load_baseline_scores(out: Path, tasks: Any) -> dict[str, Any]:
    """The baseline stage's scores of the model (not a second model) per evaluation task, as TaskScores.

    The ablation matrices start from these instead of evaluating the unablated model again: the same
    model, tasks and settings give the same numbers (the per-example values round-trip JSON exactly).
    """
    from tl_taskmap.evaluate import TaskScore
    from tl_taskmap.state_io import check_format

    path = ReportLayout(out).baseline_examples
    payload = json.loads(path.read_text())
    check_format("baseline_examples", payload.get("format_version"), path)
    saved = {s["task"]: s for s in payload["scores"] if s["model"] == MODEL_LABEL}
    scores = {}
    for task in tasks:
        s = saved[task.name]
        per_example, losses = [float(x) for x in s["per_example"]], [float(x) for x in s["losses"]]
        scores[task.name] = TaskScore(task.name, str(task.metric), sum(per_example) / len(per_example), sum(losses) / len(losses),
                                      len(per_example), task.chance, per_example, list(s["predictions"]), losses,
                                      [list(map(float, o)) for o in s["option_scores"]])
    return scores


def load_relevance(out: Path, names: Sequence[str]) -> dict[str, Any]:
    """Task → :class:`~tl_taskmap.neurons.attribution.RelevanceScores` saved by a run in ``out``."""
    from tl_taskmap.neurons.attribution import RelevanceScores

    layout = ReportLayout(out)
    return {n: RelevanceScores.load(layout.relevance(n)) for n in names}


def load_neuron_sets(out: Path, names: Sequence[str]) -> dict[str, Any]:
    """Task → :class:`~tl_taskmap.neurons.sets.NeuronSet` saved by a run in ``out``."""
    from tl_taskmap.neurons.sets import NeuronSet

    layout = ReportLayout(out)
    return {n: NeuronSet.load(layout.neuron_set(n)) for n in names}


def _neurons(run: _Run) -> tuple[list[str], dict]:
    from tl_taskmap.neurons.overlap import jaccard_matrix, overlap_sweep
    from tl_taskmap.neurons.similarity import parameter_similarity_matrix

    names = run.selection.names
    rels = load_relevance(run.out, names)
    sets = {n: rels[n].top(run.config.k, per_layer=run.config.per_layer).with_name(n) for n in names}
    files = []
    for name, neurons in sets.items():
        path = run.path(run.layout.neuron_set(name))
        neurons.save(path)
        files.append(run.rel(path))
    tables = {"jaccard.csv": jaccard_matrix(sets)}
    if len(names) > 1:  # overlap and similarity compare task pairs; a one-task map has none (the report says so)
        tables.update({
            "jaccard_per_layer.csv": jaccard_matrix(sets, per_layer=True),
            "overlap_sweep.csv": overlap_sweep({n: r.scores for n, r in rels.items()}, per_layer=run.config.per_layer),
            "parameter_similarity.csv": parameter_similarity_matrix(run.model, sets),
        })
    for file_name, table in tables.items():
        path = run.path(run.layout.neuron_table(file_name))
        if file_name == "jaccard.csv":
            table.to_csv(path, index_label="task")
        else:
            table.to_csv(path, index=False)
        files.append(run.rel(path))
    return files, {"n_neurons": {n: len(s) for n, s in sets.items()}}


def _controls(run: _Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from tl_taskmap.neurons.masked_training import load_control_model, save_control_model, train_control_model

    cfg = run.config
    # Controls share every tensor they do not change with the model (a LoRA control costs 53 MB on SmolLM2, not 538 MB).
    controls = {task: load_control_model(run.model, folder, share_weights=True) for task, folder in cfg.control_models.items()}
    records = [{"task": t, "source": folder} for t, folder in cfg.control_models.items()]
    to_train = [t for t in run.selection.names if t not in controls][: cfg.train_controls]
    sets = load_neuron_sets(run.out, to_train) if cfg.control_neurons == "task" else {}
    for name in run.bar(to_train, "control models"):
        control, result = train_control_model(run.model, run.selection[name], neurons=_control_neurons(cfg, sets, name),
                                              share_weights=True, steps=cfg.control_steps, lr=cfg.control_learning_rate,
                                              batch_size=cfg.batch_size, seed=cfg.seed, progress=run.progress, return_result=True)
        distributed.broadcast_module(control)  # ranks may round differently: every rank compares rank 0's control
        release_memory()  # the training's activations and optimizer state are garbage now
        controls[name] = control
        record = {"task": name, "source": "trained", **result.to_dict()}
        if cfg.save_controls:
            record["saved"] = run.rel(save_control_model(control, run.folder(run.layout.control_model(name)),
                                                         base_model=run.model, task=name))
        records.append(record)
    return controls, records


def _control_neurons(cfg: MapConfig, sets: dict[str, Any], task: str) -> Any:
    """What a control model of ``task`` trains: LoRA adapters, the task's neurons, or everything (None)."""
    from tl_taskmap.neurons.low_rank import LowRank

    return LowRank() if cfg.control_neurons == "lora" else sets.get(task) if cfg.control_neurons == "task" else None


def _layers(run: _Run) -> tuple[list[str], dict]:
    from tl_taskmap.distributed import distributed_compare_models
    from tl_taskmap.probes import ActivationProbe
    from tl_taskmap.stats.runner import compare_models

    controls, records = _controls(run)
    # Sharded: each rank takes a share of every task's examples, and the statistics are merged exactly.
    compare = distributed_compare_models if run.sharded else compare_models
    # The layer map reads the model's and each control's per-example vectors on the controlled tasks: kept
    # from the same forward passes as the statistics (one process only; sharded runs capture them again).
    kept = ActivationProbe(_layer_map_site(run.config), reduce=run.config.reduce) if controls and not run.sharded else None
    with warnings.catch_warnings():
        # The report shows biased and debiased CKA side by side and explains the small-n bias in the page.
        warnings.filterwarnings("ignore", message=r"biased CKA with n=\d+ examples .* is inflated")
        stats = compare(run.models(), run.evaluation, control_models=controls or None, sites=run.config.sites,
                        reduce=run.config.reduce, batch_size=run.config.batch_size, progress=run.progress,
                        **({"probes": [kept]} if kept is not None else {}))
        _layer_table(stats).to_csv(run.path(run.layout.layers.stats_csv), index=False)
    layers = run.layout.layers
    stats.save(run.folder(layers.stats))
    run.path(layers.controls).write_text(json.dumps(records, indent=1, default=str))
    control_tasks = sorted(controls)
    captured = _kept_vectors(kept, controls, _layer_map_site(run.config)) if kept is not None else {}
    del kept, stats  # only the controlled tasks' vectors go on: the rest is freed before the null controls are trained
    layer_map = _layer_map(run, controls, captured) if controls else {"files": []}  # releases each control once it is read
    return ([run.rel(p) for p in (layers.stats, layers.stats_csv, layers.controls)]
            + [run.rel(layers.folder / f) for f in layer_map["files"]],
            {"control_tasks": control_tasks, "layer_map_pair": layer_map.get("pair")})


def _layer_map_site(cfg: MapConfig) -> str:
    """The site kind of the layer map: the first configured kind (``resid_post`` when only hook names are given)."""
    from tl_taskmap.models import SITE_ALIASES

    return next((SITE_ALIASES.get(s, s) for s in cfg.sites if not s.startswith("blocks.")), "resid_post")


def _multitask(run: _Run) -> Any:
    """The multi-task fine-tune of the model (the paper's pair), or None (off, a second model given, or not cached)."""
    from tl_taskmap.neurons.multitask import multitask_model

    cfg = run.config
    unknown = sorted(set(cfg.multitask_held_out) - set(run.selection.names))
    if unknown:
        raise ConfigError(f"multitask_held_out names tasks {unknown} that this run does not have; its tasks: {run.selection.names}")
    if cfg.second_model or cfg.multitask == "off" or (cfg.multitask == "auto" and not _multitask_cached(cfg, run.selection)):
        return None
    return multitask_model(run.model, run.selection, cache_dir=_multitask_cache(cfg), held_out=cfg.multitask_held_out,
                           steps=cfg.multitask_steps, lr=cfg.multitask_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           progress=run.progress, log=run.log)


def _multitask_cache(cfg: MapConfig) -> Path:
    from tl_taskmap.embedded import cache_root

    return Path(cfg.multitask_cache).expanduser() if cfg.multitask_cache else cache_root()


def _multitask_cached(cfg: MapConfig, selection: Any) -> bool:
    from tl_taskmap.neurons.multitask import cached_multitask_keys, multitask_settings

    settings = multitask_settings(cfg.multitask_steps, cfg.multitask_lr, cfg.batch_size, cfg.seed, cfg.multitask_held_out)
    return bool(cached_multitask_keys(_multitask_cache(cfg), list(selection), settings))


def _kept_vectors(kept: Any, controls: dict[str, Any], kind: str) -> dict[tuple[str, str], Any]:
    """``{("model" | "control", task): [layer, n, d]}`` float64 arrays of the controlled tasks, from the layer stage's probe."""
    return {(role, task): kept.result(task=task, model=label).stack(kind).double().numpy()
            for task in controls for role, label in (("model", MODEL_LABEL), ("control", CONTROL_LABEL))}


def _layer_map(run: _Run, controls: dict[str, Any], captured: Optional[dict] = None) -> dict:
    """Null controls, task-vs-null differences and the base-vs-tuned pair (:mod:`tl_taskmap.report.layer_map`).

    ``captured``: the model's and the controls' vectors the layer stage already has (:func:`_kept_vectors`), not captured again.
    """
    from tl_taskmap.report.layer_map import build_layer_map

    cfg = run.config
    sets = load_neuron_sets(run.out, list(controls)) if cfg.control_neurons == "task" else {}
    sets = {task: _control_neurons(cfg, sets, task) for task in controls}
    kind = _layer_map_site(cfg)
    return build_layer_map(run.model, run.selection, run.evaluation, controls, folder=run.folder(run.layout.layers.folder), release_controls=True,
                           second=run.second, captured=captured,
                           multitask=_multitask(run), null_controls=cfg.null_controls, neurons=sets,
                           control_settings=dict(steps=cfg.control_steps, lr=cfg.control_learning_rate, batch_size=cfg.batch_size,
                                                 seed=cfg.seed, progress=False, share_weights=True),
                           n_boot=cfg.layer_map_boot, seed=cfg.seed, site=kind, reduce=cfg.reduce, batch_size=cfg.batch_size,
                           log=run.log, bar=run.bar)


def _layer_table(stats: Any) -> Any:
    """``stats.to_dataframe()`` with every row naming its model: CKA rows ``model`` = the pair's first, ``compared_with`` = its second."""
    frame = stats.to_dataframe()
    pairs = frame["model_pair"].fillna("").str.split(" vs ", n=1, expand=True).reindex(columns=[0, 1])
    is_pair = frame["model_pair"].notna()
    frame.loc[is_pair, "model"] = pairs.loc[is_pair, 0]
    frame.insert(frame.columns.get_loc("model") + 1, "compared_with", pairs[1].where(is_pair))
    return frame


def _ablation(run: _Run) -> tuple[list[str], dict]:
    from tl_taskmap.neurons.ablation import mean_activations
    from tl_taskmap.neurons.ablation_effects import ablation_matrix

    cfg = run.config
    sets = load_neuron_sets(run.out, run.selection.names)
    means = mean_activations(run.model, run.selection) if cfg.ablation_mode == "mean" else None
    matrix = ablation_matrix(run.model, run.evaluation, sets, seeds=[cfg.seed + i for i in range(cfg.seeds)], mode=cfg.ablation_mode,
                             mean_activations=means, batch_size=cfg.batch_size, progress=run.progress,
                             baselines=run.baseline_scores())
    return [run.rel(p) for p in write_ablation(matrix, run.layout.ablation)], matrix.meta


def _heads(run: _Run) -> tuple[list[str], dict]:
    from tl_taskmap.report.heads import heads_stage

    return heads_stage(run)
def _selection(run: _Run) -> tuple[list[str], dict]:
    """Selection-method comparison (:mod:`tl_taskmap.neurons.selection_compare`), reusing gradxact's relevance and ablation matrix."""
    from tl_taskmap.neurons.ablation import mean_activations
    from tl_taskmap.neurons.ablation_effects import AblationMatrix
    from tl_taskmap.neurons.selection_compare import compare_selections

    cfg, names = run.config, run.selection.names
    if not cfg.selection or len(names) < 2:
        return [], {"skipped": "no selection methods given" if not cfg.selection else "comparing methods needs ≥ 2 tasks"}
    gradxact = {n: r.scores for n, r in load_relevance(run.out, names).items()}
    # the ablation stage ablated exactly the gradxact sets with the same seeds and mode: reuse it
    reuse = {"gradxact": AblationMatrix.load(run.results.ablation.matrix)}
    means = mean_activations(run.model, run.selection) if cfg.ablation_mode == "mean" else None
    comparison = compare_selections(run.model, run.selection, run.evaluation, cfg.selection, k=cfg.k, per_layer=cfg.per_layer,
                                    seeds=[cfg.seed + i for i in range(cfg.seeds)], mode=cfg.ablation_mode, mean_activations=means,
                                    batch_size=cfg.batch_size, gradient_batch_size=cfg.gradient_batch_size, gradxact=gradxact, matrices=reuse,
                                    baselines=run.baseline_scores(), progress=run.progress)
    files = comparison.save(run.folder(run.layout.selection))
    return [run.rel(f) for f in files], {"verdict": comparison.verdict}


# ---------------------------------------------------------------------------------------- the stages
@dataclass
class _StageContext:
    """What a stage's ``extra`` hash inputs may read: the run, its configuration, the finished stages' records."""

    run: _Run
    config: MapConfig
    stages: dict[str, dict[str, Any]]

    @functools.cached_property
    def second_model(self) -> Optional[str]:
        from tl_taskmap.embedded import model_fingerprint

        return model_fingerprint(self.config.second_model) if self.config.second_model else None


def _baseline_extra(ctx: _StageContext) -> dict[str, Any]:
    return {"second_model": ctx.second_model}


def _layers_extra(ctx: _StageContext) -> dict[str, Any]:
    from tl_taskmap.embedded import model_fingerprint

    cfg = ctx.config
    return {"second_model": ctx.second_model, "control_models": {t: model_fingerprint(f) for t, f in cfg.control_models.items()},
            "multitask_cached": cfg.multitask == "auto" and not cfg.second_model and _multitask_cached(cfg, ctx.run.selection),
            "neurons": ctx.stages["neurons"]["hash"] if cfg.control_neurons == "task" else None}


#: The pipeline, in the order it runs. ``tests``: the version of a stage's statistical tests (a change re-runs it).
STAGES: tuple[StageSpec, ...] = (
    StageSpec("baseline", _baseline, constants={"tests": 2}, extra=_baseline_extra),
    StageSpec("relevance", _relevance),
    StageSpec("neurons", _neurons, fields=("k", "per_layer"), after=("relevance",), model=False, tasks=False),
    StageSpec("layers", _layers, after=("neurons",), extra=_layers_extra,
              fields=("second_model", "sites", "reduce", "train_controls", "control_steps", "control_lr", "control_neurons",
                      "control_models", "seed", "null_controls", "layer_map_boot", "multitask", "multitask_steps", "multitask_lr",
                      "multitask_held_out")),
    # The ablation, heads and selection stages start from the baseline stage's scores of the model; they do not list
    # it in ``after`` because its hash inputs (model, tasks, and the second model, which these stages never score)
    # are already theirs, so its scores cannot differ between two runs that reuse them.
    StageSpec("ablation", _ablation, fields=("seeds", "ablation_mode", "seed"), after=("neurons",), constants={"tests": 2}),
    # attention heads as units: relevance, sets, overlap, ablation (tl_taskmap.report.heads)
    StageSpec("heads", _heads, fields=("k", "per_layer", "seeds", "ablation_mode", "seed"), enabled=lambda config: config.heads),
    StageSpec("selection", _selection, fields=("selection", "k", "per_layer", "seeds", "ablation_mode", "seed"),
              after=("relevance", "ablation")),
)
check_stage_order(STAGES)


# ---------------------------------------------------------------------------------------- result
@dataclass
class ReportResult:
    """What :func:`map_model` wrote; loaders read the saved results back.

    Attributes:
        out: The output folder. html: ``report.html``. figures: figure name → PNG path.
        config: The configuration used. stages: stage name → its record (``cached``, ``seconds``, files).
        seconds: Wall time of this call. left_out: Comparisons the run could not make, and why.

    Example:
        >>> result = map_model(MapConfig(out="r"))   # doctest: +SKIP
        >>> result.baseline().head()                 # doctest: +SKIP
    """

    out: Path
    html: Path
    config: MapConfig
    stages: dict[str, dict[str, Any]]
    figures: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    left_out: list[str] = field(default_factory=list)

    def baseline(self) -> Any:
        """Baseline scores (pandas DataFrame: model, task, metric, metric_value, loss, chance, ...)."""
        import pandas as pd

        return pd.read_csv(ReportLayout(self.out).baseline)

    def layer_stats(self) -> Any:
        """The :class:`~tl_taskmap.stats.results.LayerStats` of the layer-map stage."""
        from tl_taskmap.stats.results import LayerStats

        return LayerStats.load(ReportLayout(self.out).layers.stats)

    def neuron_sets(self) -> dict[str, Any]:
        """Task → top-k% :class:`~tl_taskmap.neurons.sets.NeuronSet`."""
        return load_neuron_sets(self.out, self.stages["neurons"]["n_neurons"])

    def ablation(self) -> Any:
        """The :class:`~tl_taskmap.neurons.ablation_effects.AblationMatrix`."""
        from tl_taskmap.neurons.ablation_effects import AblationMatrix

        return AblationMatrix.load(ReportLayout(self.out).ablation.matrix)

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import report_result_html

        return report_result_html(self)

    def __repr__(self) -> str:
        ran = [n for n, r in self.stages.items() if not r.get("cached")]
        return f"ReportResult({str(self.html)!r}, {len(self.figures)} figures, ran={ran}, {self.seconds:.0f} s)"


def map_model(config: MapConfig, tasks: Any = None, *, force: bool = False, progress: bool = True,
              log: Optional[Callable[[str], None]] = None) -> ReportResult:
    """Run the whole task map for ``config`` and write the report folder.

    Args:
        config: The run's :class:`MapConfig` (validated here, before any model is loaded).
        tasks: Tasks built in Python (a list of :class:`~tl_taskmap.tasks.Task` or a TaskSuite) to map instead
            of ``config.tasks`` / the built-in suite; their contents are fingerprinted into the stage records
            (``config.json`` cannot hold them, so pass the same tasks again to reuse finished stages).
        force: Recompute every stage even where a matching one is on disk.
        progress: Progress bars on long stages. log: Where stage messages go (default: stderr).

    Returns:
        A :class:`ReportResult`.

    Example:
        >>> result = map_model(MapConfig(out="report", examples=16, seeds=1))   # doctest: +SKIP
        >>> result.stages["relevance"]["cached"]                                 # doctest: +SKIP
        False
    """
    config.validate()
    with distributed.maybe_distributed() as rank_device:  # a no-op unless launched by torchrun
        device = config.device
        if rank_device is not None and rank_device.type == "cuda" and device.startswith("cuda"):
            device = str(rank_device)  # each rank its own GPU
        if not distributed.is_main_process():
            log = lambda message: None  # noqa: E731 - one rank speaks
        return _map_model(config, tasks, force, progress, log, device)


def _map_model(config: MapConfig, tasks: Any, force: bool, progress: bool, log: Optional[Callable[[str], None]], device: str) -> ReportResult:
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    start = time.perf_counter()
    run = _Run(config, tasks, log, progress, device)
    try:
        check_file_names(run.selection.names)  # before any stage: two tasks must never share a result file
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if distributed.is_main_process():
        try:
            run.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create out={config.out!r} ({err.strerror}); choose a writable --out") from None
    with maybe_lock(run.out, distributed.is_main_process()):
        return _map_stages(run, config, force, log, start)


def _map_stages(run: _Run, config: MapConfig, force: bool, log: Callable[[str], None], start: float) -> ReportResult:
    from tl_taskmap.embedded import model_fingerprint

    if distributed.is_main_process():  # the in-progress configuration; config.json is written with the report
        write_json_atomic(run.results.current_config, config.to_dict())
    # The models' identity is their content (a model retrained in place at the same path is another model).
    model_id = {"model": model_fingerprint(config.model), "dtype": config.dtype}
    tasks_id = {"selection": _fingerprint(run.selection), "evaluation": _fingerprint(run.evaluation)}
    store = StageStore(run.out, force, write_root=run.write_root, stage_into=run.writing_into)
    stages: dict[str, dict[str, Any]] = {}
    context = _StageContext(run, config, stages)
    for spec in STAGES:
        if spec.enabled(config):
            inputs = spec.inputs(config, model=model_id, tasks=tasks_id, upstream=stages, context=context)
            stages[spec.name] = store.run(spec.name, inputs, functools.partial(spec.compute, run), log)

    from tl_taskmap.report.html import ReportContent, write_report
    from tl_taskmap.report.notes import left_out
    from tl_taskmap.task_spec import row_notes

    notes = row_notes(run.selection, run.evaluation, config.examples) + left_out(config, run.selection, stages["layers"].get("control_tasks", []))
    log("[report] writing figures and report.html")
    html, figures = run.results.html, {}
    computed = time.perf_counter() - start  # the page states this time; drawing the page comes after it
    if distributed.is_main_process():
        content = ReportContent(
            model_name=config.model or "SmolLM2-135M-Instruct (embedded)", selection=run.selection, evaluation=run.evaluation,
            stages=stages, notes=notes, k=config.k, per_layer=config.per_layer, seeds=config.seeds, examples=config.examples,
            has_second=bool(config.second_model), device=config.device, dtype=config.dtype, configuration=config.to_dict(),
            seconds=computed, model_seconds=run.model_seconds)
        html, figures = write_report(run.out, content)
        write_json_atomic(run.results.config, config.to_dict())  # describes report.html: written with it, at the end
    distributed.barrier()
    if run.write_root != run.out:
        shutil.rmtree(run.write_root, ignore_errors=True)
    seconds = time.perf_counter() - start
    log(f"report: {html} ({computed:.0f} s as stated in the page + {seconds - computed:.0f} s drawing it; "
        f"stages run: {[n for n, r in stages.items() if not r['cached']] or 'none'})")
    return ReportResult(run.out, html, config, stages, figures, seconds, notes)
