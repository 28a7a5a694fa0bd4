"""A multi-task fine-tune the tool trains itself: the stand-in for an instruction-tuned model.

Zhao et al. (2024) compare a pre-trained model with its instruction-tuned (multi-task) version, each
against single-task control models. No base/instruction-tuned pair of one family installs offline,
but the experiment's structure only needs a starting checkpoint, a multi-task fine-tune of it, and
single-task fine-tunes of it. :func:`multitask_model` makes the multi-task fine-tune: full fine-tuning
on the union of the tasks' (selection) examples, answer-token loss, batches drawn from a seeded shuffle
of the union (so every batch mixes tasks; no task comes in a block), fixed seed.

It is cached *content-addressed*: the folder name is a hash of the base model's weights, the training
tasks' contents and the training settings, so a changed task or setting trains a new model and an
unchanged one is loaded (a delta against the base, safetensors + JSON manifest).

Example:
    >>> mt = multitask_model(model, selection, cache_dir="~/.cache/tl_taskmap", steps=200)   # doctest: +SKIP
    >>> mt.cached, mt.trained_on, mt.held_out                                               # doctest: +SKIP
    (False, ['word_sentiment', 'past_tense'], ['phrase_relatedness'])
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tl_taskmap.neurons.masked_training import _combined_fingerprint, finetune, copy_model, load_control_model, save_control_model
from tl_taskmap.tasks import Example, Task
from tl_taskmap.state_io import FORMAT_VERSIONS

__all__ = ["MultitaskModel", "multitask_union", "multitask_fingerprint", "multitask_model", "MULTITASK_FORMAT_VERSION",
           "tasks_settings_key", "cached_multitask_keys", "multitask_settings"]


def multitask_settings(steps: int, lr: float, batch_size: int, seed: int, held_out: Sequence[str]) -> dict[str, Any]:
    """The training settings that, with the base weights and the tasks, name a cached multi-task model."""
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "held_out": sorted(held_out)}

MULTITASK_FORMAT_VERSION = FORMAT_VERSIONS["multitask_model"]


def _tasks_of(suite: Any) -> list[Task]:
    return list(suite)


def multitask_union(tasks: Sequence[Task], held_out: Sequence[str] = ()) -> Task:
    """One task holding every example of ``tasks`` except the ``held_out`` ones (the training set of E).

    Example:
        >>> a = Task.from_lists("a", ["x"], [" 1"]); b = Task.from_lists("b", ["y"], [" 2"])
        >>> len(multitask_union([a, b])), multitask_union([a, b], held_out=["b"]).meta["tasks"]
        (2, ['a'])
    """
    unknown = sorted(set(held_out) - {t.name for t in tasks})
    if unknown:
        raise ValueError(f"held-out tasks {unknown} are not in the suite ({[t.name for t in tasks]})")
    train = [t for t in tasks if t.name not in set(held_out)]
    if not train:
        raise ValueError("every task is held out: the multi-task model needs at least one training task")
    # Options are dropped: only the target completion is trained on, and tasks may mix metrics.
    examples = [Example(e.prompt, e.target) for t in train for e in t.examples]
    return Task("multitask", examples, cluster="multitask", metric="exact_match", meta={"tasks": [t.name for t in train]})


def tasks_settings_key(tasks: Sequence[Task], settings: dict[str, Any]) -> str:
    """The model-independent part of the cache key (task contents + settings), stored in each manifest so a
    run can tell whether a matching multi-task model is cached without loading the base model.

    Example:
        >>> tasks_settings_key([Task.from_lists("a", ["x"], [" 1"])], {"steps": 1})
        '87c990fde4ed8566'
    """
    payload = {"format": MULTITASK_FORMAT_VERSION, "settings": settings,
               "tasks": [(t.name, [(e.prompt, e.target) for e in t.examples]) for t in tasks]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_multitask_keys(cache_dir: str | os.PathLike, tasks: Sequence[Task], settings: dict[str, Any]) -> list[str]:
    """Cache entries trained on these tasks with these settings (for any base; loading checks the base's weights).

    Example:
        >>> cached_multitask_keys("cache", suite, settings)   # doctest: +SKIP
        ['3f0c9a1e2b7d4c55']
    """
    wanted = tasks_settings_key(list(tasks), settings)
    found = []
    for manifest in sorted((Path(cache_dir).expanduser() / "multitask").glob("*/manifest.json")):
        try:
            if json.loads(manifest.read_text())["meta"].get("tasks_settings") == wanted:
                found.append(manifest.parent.name)
        except (OSError, ValueError, KeyError):
            continue
    return found


def multitask_fingerprint(base_model: Any, tasks: Sequence[Task], settings: dict[str, Any]) -> str:
    """Content hash of (base weights, task contents, training settings): the multi-task model's cache key.

    Example:
        >>> multitask_fingerprint(model, suite, {"steps": 200})   # doctest: +SKIP
        '3f0c9a1e2b7d4c55'
    """
    payload = {"format": MULTITASK_FORMAT_VERSION, "base": _combined_fingerprint(base_model), "settings": settings,
               "tasks": [(t.name, [(e.prompt, e.target) for e in t.examples]) for t in tasks]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class MultitaskModel:
    """A multi-task fine-tune of a base model and where it came from.

    Attributes:
        model: The fine-tuned network (a copy; the base is unchanged).
        folder: Its cache folder. key: The content hash naming the folder.
        trained_on: Tasks in the training union. held_out: Tasks kept out (the paper's unseen tasks).
        cached: Loaded from the cache rather than trained now. losses: Training loss per step.
        settings: steps, lr, batch_size, seed.
    """

    model: Any
    folder: Path
    key: str
    trained_on: list[str]
    held_out: list[str]
    cached: bool
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        how = "loaded from cache" if self.cached else "trained"
        return (f"MultitaskModel({self.key}, {how}, trained on {self.trained_on}, held out {self.held_out}, "
                f"{self.settings.get('steps')} steps)")


def multitask_model(base_model: Any, tasks: Any, *, cache_dir: str | os.PathLike, held_out: Sequence[str] = (),
                    steps: int = 200, lr: float = 1e-4, batch_size: int = 8, seed: int = 0, progress: bool = True,
                    log: Any = None) -> MultitaskModel:
    """Load the multi-task fine-tune of ``base_model`` on ``tasks`` from ``cache_dir``, or train and cache it.

    Args:
        base_model: The starting checkpoint (never changed).
        tasks: The training tasks (a TaskSuite or Task list; use the *selection* split).
        cache_dir: Folder holding ``multitask/<key>/``; the key hashes base weights, task contents and settings.
        held_out: Task names kept out of training (reported as unseen tasks).
        steps, lr, batch_size, seed: Full fine-tuning settings (AdamW, answer-token loss, see
            :func:`~tl_taskmap.neurons.masked_training.finetune`).

    Example:
        >>> mt = multitask_model(model, selection, cache_dir="cache", steps=50, progress=False)   # doctest: +SKIP
    """
    task_list = _tasks_of(tasks)
    union = multitask_union(task_list, held_out)
    settings = multitask_settings(steps, lr, batch_size, seed, held_out)
    key = multitask_fingerprint(base_model, task_list, settings)
    folder = Path(cache_dir).expanduser() / "multitask" / key
    trained_on = union.meta["tasks"]
    if (folder / "manifest.json").is_file() and (folder / "weights.safetensors").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        model = load_control_model(base_model, folder)
        if log:
            log(f"[multitask] loaded the multi-task model {key} from {folder}")
        return MultitaskModel(model, folder, key, trained_on, sorted(held_out), True, manifest["meta"].get("losses", []), settings)
    if log:
        log(f"[multitask] training the multi-task model on {trained_on} ({steps} steps; cached as {folder})")
    model = copy_model(base_model)
    result = finetune(model, union, "all", steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    meta = {"trained_on": trained_on, "held_out": sorted(held_out), "settings": settings, "losses": result.losses,
            "seconds": result.seconds, "key": key, "tasks_settings": tasks_settings_key(task_list, settings)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:  # written in a scratch folder, then renamed: a crash never leaves a half-written cache entry
        save_control_model(model, scratch, base_model=base_model, task="multitask", meta=meta)
        try:
            os.replace(scratch, folder)
        except OSError:  # another process finished the same key first; theirs is identical
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return MultitaskModel(model, folder, key, trained_on, sorted(held_out), False, result.losses, settings)
