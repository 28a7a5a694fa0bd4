"""The layer map against null controls, and the paper's base-vs-tuned pair, as one report step.

:func:`build_layer_map` takes the model, its task controls and the tasks, and

1. trains a **null control** per task control: the same fine-tuning on the task's prompts with
   shuffled answers (:func:`~tl_taskmap.neurons.masked_training.train_null_control_model`);
2. captures the last-prompt-token residual stream of every model on each task's *evaluation* examples
   (:func:`~tl_taskmap.activations.capture`), one ``[n, d]`` matrix per layer;
3. with one model: where the task control departs from the model more than the null control does
   (:func:`~tl_taskmap.stats.layer_map.task_vs_null`), and which layers any fine-tune leaves unchanged;
4. with a base + tuned pair (``second`` = base given by the user, which takes precedence; else a
   multi-task fine-tune of the model, which then plays the *tuned* role and the model the *base*):
   the paper's comparison for task controls and for null controls, the section rule on each with its
   thresholds, and which gains survive the null (:func:`~tl_taskmap.stats.layer_map.paper_pair_vs_null`).
   Tasks held out of the multi-task training are marked ``unseen`` and get their own sections.

Files (under ``folder``): ``task_vs_null.csv``, ``pair.csv``, ``null_pair.csv``, ``pair_vs_null.csv``,
``multitask_scores.csv`` and ``layer_map.json`` (rules, sections, which pair, held-out tasks).

Example:
    >>> meta = build_layer_map(model, selection, evaluation, controls, folder=Path("out/layers"))   # doctest: +SKIP
    >>> meta["pair"], meta["task_specific_layers"]                                                 # doctest: +SKIP
    (None, {'word_sentiment': [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]})
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pandas as pd

from tl_taskmap.memory import release_memory
from tl_taskmap.report.layout import LAYER_MAP_TABLES, LayersLayout

__all__ = ["build_layer_map", "UNCHANGED_CKA", "read_layer_map"]

#: A layer is "left unchanged by fine-tuning" when CKA(model, control) and CKA(model, null control) are at
#: least this for every task.
UNCHANGED_CKA = 0.95


def _layers_of(model: Any, task: Any, site: str, reduce: str, batch_size: int) -> np.ndarray:
    from tl_taskmap.activations import capture

    acts = capture(model, task.prompts, sites=site, reduce=reduce, batch_size=batch_size, progress=False)
    return acts.stack(site).double().numpy()


def _write_csv(frame: pd.DataFrame, path: Path) -> str:
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path.name


def _sections(frame: pd.DataFrame, tasks: list[str]) -> Optional[dict]:
    from tl_taskmap.stats.sections import detect_sections

    rows = frame[frame["task"].isin(tasks)]
    if rows.empty:
        return None
    tuned = rows.pivot(index="task", columns="layer", values="cka_a").to_numpy()
    base = rows.pivot(index="task", columns="layer", values="cka_b").to_numpy()
    layers = sorted(rows["layer"].unique())
    return detect_sections(tuned, base, layers=layers).to_dict()


def build_layer_map(
    model: Any, selection: Any, evaluation: Any, controls: Mapping[str, Any], *, folder: Path, release_controls: bool = False,
    second: Any = None, captured: Optional[Mapping[tuple[str, str], np.ndarray]] = None, multitask: Any = None,
    null_controls: bool = True, neurons: Optional[Mapping[str, Any]] = None,
    control_settings: Optional[dict] = None, n_boot: int = 1000, seed: int = 0, site: str = "resid_post",
    reduce: str = "last", batch_size: int = 8, log: Callable[[str], None] = lambda m: None,
    bar: Callable[[Any, str], Any] = lambda items, desc: items,
) -> dict:
    """Null controls, task-vs-null differences and (with a pair) the paper's comparison; writes ``folder``.

    Args:
        model: The model (the *tuned* model when ``second`` is given, the *base* when ``multitask`` is).
        selection, evaluation: Task suites; controls are trained on ``selection``, everything is measured
            on ``evaluation``.
        controls: Task → its control model C_t (fine-tuned from ``model``).
        second: A user-given base model (takes precedence over ``multitask``).
        captured: ``{("model" | "control", task): [layer, n, d]}`` vectors already captured with the same site,
            reduction and batches (e.g. during :func:`~tl_taskmap.stats.runner.compare_models`); not captured again.
        multitask: A :class:`~tl_taskmap.neurons.multitask.MultitaskModel` (the tuned model of the pair).
        null_controls: Train a null control per control (without them only the pair is computed).
        release_controls: Delete each control from ``controls`` (a dict the caller gives up) once its layers are read, so
            the fine-tuned copies are never all in memory together.
        neurons: Task → what its control trained (a NeuronSet or LowRank adapters; the nulls train the same), or None for all parameters.
        control_settings: ``finetune`` keyword arguments the controls were trained with (the nulls use the same).
        n_boot: Bootstrap resamples. seed: Seeds the null shuffles and the bootstrap.

    Returns:
        A JSON-able dict (also written as ``layer_map.json``): ``pair`` (None, ``"second"`` or ``"multitask"``),
        ``files``, ``rules``, ``task_specific_layers``, ``unchanged_layers``, ``sections``, ``held_out``.
    """
    from tl_taskmap.neurons.masked_training import train_null_control_model
    from tl_taskmap.stats.layer_map import paper_pair, paper_pair_vs_null, task_vs_null

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = LayersLayout(folder)
    settings = dict(control_settings or {})
    pair = "second" if second is not None else ("multitask" if multitask is not None else None)
    tuned, base = (model, second) if pair == "second" else (multitask.model, model) if pair == "multitask" else (None, None)
    held_out = list(multitask.held_out) if pair == "multitask" else []

    # Memory: every fine-tuned model is read once (its per-example layers) and released at once, so at most
    # the model, one fine-tuned copy and its optimizer state are alive together (a LoRA control shares all
    # but its adapted tensors with the model: see train_control_model's share_weights).
    acts: dict[str, dict[str, np.ndarray]] = {"model": {}, "control": {}, "null": {}, "tuned": {}, "base": {}}
    names = list(controls)
    captured = captured or {}
    for name in bar(names, "layer-map capture"):
        task = evaluation[name]
        for role in ("model", "control"):  # no local name may keep the control alive once it is released below
            given = captured.get((role, name))
            acts[role][name] = given if given is not None else _layers_of(model if role == "model" else controls[name], task, site,
                                                                          reduce, batch_size)
        if release_controls:
            del controls[name]
            release_memory()
        if pair:
            acts["tuned"][name] = acts["model"][name] if tuned is model else _layers_of(tuned, task, site, reduce, batch_size)
            acts["base"][name] = acts["model"][name] if base is model else _layers_of(base, task, site, reduce, batch_size)
    null_records = []
    if null_controls:
        for name in bar(names, "null controls"):
            null, result = train_null_control_model(model, selection[name], shuffle_seed=seed + 1,
                                                    neurons=(neurons or {}).get(name), return_result=True, **settings)
            acts["null"][name] = _layers_of(null, evaluation[name], site, reduce, batch_size)
            null_records.append({"task": name, "source": "trained on shuffled answers", **result.to_dict()})
            del null, result
            release_memory()
    layout.null_controls.write_text(json.dumps(null_records, indent=1, default=str))
    nulls = acts["null"]

    meta: dict[str, Any] = {"pair": pair, "held_out": held_out, "files": [layout.null_controls.name], "rules": {},
                            "sections": {}, "task_specific_layers": {}, "unchanged_layers": None, "n_boot": n_boot,
                            "unchanged_threshold": UNCHANGED_CKA}
    if nulls:
        parts = [task_vs_null(acts["model"][t], acts["control"][t], acts["null"][t], task=t, n_boot=n_boot, seed=seed)
                 for t in nulls]
        frame = pd.concat([p.frame for p in parts], ignore_index=True)
        meta["files"].append(_write_csv(frame, layout.table("task_vs_null")))
        meta["rules"]["task_vs_null"] = "task-specific layers: " + parts[0].rule
        meta["task_specific_layers"] = {t: p.task_specific_layers() for t, p in zip(nulls, parts)}
        both = frame.groupby("layer")[["cka_a", "cka_b"]].min().min(axis=1)
        meta["unchanged_layers"] = [int(x) for x in both.index[both >= UNCHANGED_CKA]]
        meta["rules"]["unchanged"] = (f"layers fine-tuning leaves unchanged: CKA(model, task control) and CKA(model, null "
                                      f"control) ≥ {UNCHANGED_CKA} for every task (biased linear CKA).")
    if pair:
        labels = {"second": ("model", "second model"), "multitask": ("multi-task", "base")}[pair]
        real = paper_pair(acts["tuned"], acts["base"], acts["control"], n_boot=n_boot, seed=seed, tuned_label=labels[0],
                          base_label=labels[1])
        real.frame["unseen"] = real.frame["task"].isin(held_out)
        meta["files"].append(_write_csv(real.frame, layout.table("pair")))
        meta["rules"]["pair"] = "gain over base: " + real.rule
        seen = [t for t in controls if t not in held_out]
        unseen = [t for t in controls if t in held_out]
        meta["sections"]["pair"] = _sections(real.frame, seen)
        meta["sections"]["pair_unseen"] = _sections(real.frame, unseen)
        meta["task_specific_layers_pair"] = {t: real.task_specific_layers(t) for t in controls}
        if nulls:
            null_pair = paper_pair(acts["tuned"], acts["base"], acts["null"], n_boot=n_boot, seed=seed,
                                   tuned_label=labels[0], base_label=labels[1])
            null_pair.frame["unseen"] = null_pair.frame["task"].isin(held_out)
            meta["files"].append(_write_csv(null_pair.frame, layout.table("null_pair")))
            meta["sections"]["null_pair"] = _sections(null_pair.frame, seen)
            survive = paper_pair_vs_null(acts["tuned"], acts["base"], acts["control"], acts["null"], n_boot=n_boot, seed=seed)
            survive.frame["unseen"] = survive.frame["task"].isin(held_out)
            meta["files"].append(_write_csv(survive.frame, layout.table("pair_vs_null")))
            meta["rules"]["pair_vs_null"] = "gains that survive the null: " + survive.rule
            meta["survive_null_layers"] = {t: survive.task_specific_layers(t) for t in survive.frame["task"].unique()}
        if pair == "multitask":
            meta["multitask"] = {"key": multitask.key, "cached": multitask.cached, "trained_on": multitask.trained_on,
                                 "settings": multitask.settings, "folder": str(multitask.folder)}
            meta["files"].append(_write_csv(_scores(model, multitask, evaluation, batch_size, held_out),
                                            layout.table("multitask_scores")))
    layout.layer_map.write_text(json.dumps(meta, indent=1, default=str))
    meta["files"].append(layout.layer_map.name)
    return meta


def _scores(base: Any, multitask: Any, evaluation: Any, batch_size: int, held_out: list[str]) -> pd.DataFrame:
    from tl_taskmap.evaluate import evaluate_task

    rows = []
    for task in evaluation:
        before = evaluate_task(base, task, batch_size=batch_size)
        after = evaluate_task(multitask.model, task, batch_size=batch_size)
        rows.append({"task": task.name, "unseen": task.name in held_out, "metric": before.metric, "n": before.n,
                     "base": before.metric_value, "multitask": after.metric_value,
                     "gain": after.metric_value - before.metric_value, "base_loss": before.loss, "multitask_loss": after.loss})
    return pd.DataFrame(rows)


def read_layer_map(folder: Path) -> Optional[dict]:
    """The ``layer_map.json`` of a run's ``layers/`` folder with its tables loaded (None when absent).

    Example:
        >>> lm = read_layer_map(Path("taskmap-report/layers"))   # doctest: +SKIP
        >>> lm["tables"]["task_vs_null"].head()                   # doctest: +SKIP
    """
    layout = LayersLayout(Path(folder))
    if not layout.layer_map.is_file():
        return None
    meta = json.loads(layout.layer_map.read_text())
    meta["tables"] = {name: pd.read_csv(layout.table(name)) for name in LAYER_MAP_TABLES if layout.table(name).is_file()}
    return meta
