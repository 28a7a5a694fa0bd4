"""The configuration of a task-map run (:class:`MapConfig`) and its validation.

:meth:`MapConfig.validate` checks every field — paths, ``k``, seeds, dtype and device names, sites —
without loading a model, so the command line fails on a bad option in a fraction of a second. The
pipeline itself is :func:`tl_taskmap.report.map_model`.

Example:
    >>> from tl_taskmap.report.config import MapConfig
    >>> MapConfig(out="report", k=0.05).validate().to_dict()["k"]
    0.05
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

DTYPES = ("float32", "bfloat16", "float16")
REDUCTIONS = ("last", "mean")
ABLATION_MODES = ("zero", "mean", "params")
CONTROL_NEURONS = ("lora", "full", "task")
#: Rows per forward + backward pass in the gradient stages (relevance, head relevance, selection scores): a
#: backward pass keeps every layer's activations, so these stages take at most this many rows at a time
#: whatever ``batch_size`` says (peak memory; the sums over examples agree up to float rounding).
GRADIENT_BATCH = 8
#: The learning rate of a trained control model when ``control_lr`` is not given, per ``control_neurons``.
CONTROL_LR = {"lora": 2e-3, "full": 1e-4, "task": 1e-4}
#: Selection methods of :mod:`tl_taskmap.neurons.selection` compared in the report (its ``METHODS``).
SELECTION_METHODS = ("gradxact", "contrastive", "specific", "exclusive")
#: The default comparison: the paper's method and the one that separated own from other tasks' neurons on the
#: embedded model (scripts/table2_ncft.py, README); each extra method costs one more ablation matrix.
DEFAULT_SELECTION = ("gradxact", "exclusive")
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


from tl_taskmap.errors import ConfigError  # noqa: E402  (re-exported: tl_taskmap.report.config.ConfigError)


@dataclass
class MapConfig:
    """Everything one task-map run depends on; written to ``<out>/config.json``.

    Attributes:
        out: Output folder.
        model: ``None`` for the embedded SmolLM2-135M-Instruct, else a local Hugging Face folder or a
            hub name, booted as a ``TransformerBridge``.
        second_model: Optional second model on the same inputs (e.g. the base model of ``model``):
            CKA between the two per layer, and the paper's base-vs-tuned layer sections.
        control_models: Task name → folder saved by :func:`~tl_taskmap.neurons.masked_training.save_control_model`.
        train_controls: Train control models C_t for this many tasks (the first ones without a given
            control model); 0 for none. controls are cheap on CPU: few steps, short prompts.
        control_steps, control_lr: Fine-tuning budget of each trained control model; ``control_lr=None``
            takes :data:`CONTROL_LR` for the ``control_neurons`` setting (2e-3 for LoRA, 1e-4 otherwise).
        control_neurons: ``"lora"`` (default: rank-8 LoRA adapters on the query and value projections,
            as the paper trained C_t; the control shares every other tensor with the model, so it costs
            53 MB instead of a 538 MB copy on SmolLM2), ``"full"`` (all parameters) or ``"task"`` (only the
            task's top-k neurons).
        save_controls: Also write trained control models to ``<out>/controls/<task>/`` (safetensors).
        tasks: Empty for the built-in suite, else task files (``.json/.jsonl/.csv/.parquet``, or a
            BIG-bench ``task.json``) or ``hf:NAME`` for a ``datasets`` hub name (needs internet).
        task_names: Tasks of the built-in suite to use (default: :data:`DEFAULT_TASKS`).
        template: Prompt template of file / datasets tasks: ``{column}`` placeholders, e.g.
            ``"Review: {text}\nSentiment:"`` (a BIG-bench ``task.json`` uses ``{input}``; default there: ``Q: {input}\nA:``).
        target_template: Answer template, e.g. ``" {label}"``; with options, an integer picks ``options[i]``.
            Answers usually start with a space (``" positive"``) so they tokenize as a continuation.
        options: Answer options shared by every row (multiple choice); options_field: a column holding
            each row's options instead. Neither: generation (exact match).
        split: Split of a ``datasets`` hub task.
        examples: Examples per task (half selects neurons, half measures); at least 8.
        sites: Site kinds captured for the layer map (``resid_post``, ``mlp_out``, ...).
        reduce: Per-example reduction: ``"last"`` prompt token (the paper's) or ``"mean"``.
        k: Fraction of neurons per task set (top-k%, 0.1 = 10%). per_layer: top-k per layer or global.
        seeds: Random neuron sets per ablation row (matched per-layer counts).
        ablation_mode: ``"zero"``, ``"mean"`` or ``"params"``.
        heads: Also map attention heads (head relevance, top-k head sets, their overlap and ablation matrix).
        selection: Selection methods compared side by side (``gradxact``, ``contrastive``, ``specific``,
            ``exclusive``; empty: no comparison). The task sets of the other stages are always ``gradxact``.
        device, dtype, batch_size, seed: Where and how things run; ``seed`` fixes splits and training.
        null_controls: Train a *null control* per control model (same fine-tuning, shuffled answers); the layer
            map then reports where the task control departs from the model more than the null does.
        layer_map_boot: Bootstrap resamples of examples for the layer-map intervals (≥ 100).
        multitask: The paper's base-vs-tuned pair from a multi-task fine-tune of the model on the selection
            splits: ``"auto"`` (use it when one is cached), ``"train"`` (train it if needed), ``"off"``.
            ``second_model`` takes precedence. multitask_steps, multitask_lr: its fine-tuning budget.
        multitask_held_out: Tasks kept out of the multi-task training (the paper's unseen tasks).
        multitask_cache: Folder of the multi-task model cache (default: the asset cache, ``$TL_TASKMAP_CACHE``).

    Example:
        >>> cfg = MapConfig(out="report", k=0.05, seeds=2)
        >>> cfg.validate().k
        0.05
    """

    out: str = "taskmap-report"
    model: Optional[str] = None
    second_model: Optional[str] = None
    control_models: dict[str, str] = field(default_factory=dict)
    train_controls: int = 2
    control_steps: int = 6
    control_lr: Optional[float] = None
    control_neurons: str = "lora"
    save_controls: bool = False
    tasks: list[str] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    template: str = "{input}"
    target_template: str = "{target}"
    options: list[str] = field(default_factory=list)
    options_field: Optional[str] = None
    split: str = "train"
    examples: int = 160
    sites: list[str] = field(default_factory=lambda: ["resid_post"])
    reduce: str = "last"
    k: float = 0.1
    per_layer: bool = True
    seeds: int = 5
    ablation_mode: str = "zero"
    heads: bool = True
    selection: list[str] = field(default_factory=lambda: list(DEFAULT_SELECTION))
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16
    seed: int = 0
    null_controls: bool = True
    layer_map_boot: int = 1000
    multitask: str = "auto"
    multitask_steps: int = 100
    multitask_lr: float = 1e-4
    multitask_held_out: list[str] = field(default_factory=list)
    multitask_cache: Optional[str] = None

    # ------------------------------------------------------------------ validation
    @property
    def gradient_batch_size(self) -> int:
        """``batch_size``, at most :data:`GRADIENT_BATCH`: the rows of one backward pass in the gradient stages."""
        return min(self.batch_size, GRADIENT_BATCH)

    @property
    def control_learning_rate(self) -> float:
        """``control_lr``, or the default of the ``control_neurons`` setting (:data:`CONTROL_LR`)."""
        return float(self.control_lr) if self.control_lr is not None else CONTROL_LR.get(self.control_neurons, 1e-4)

    def validate(self) -> "MapConfig":
        """Check every field without loading a model; raise :class:`ConfigError` naming the field.

        Example:
            >>> MapConfig(k=1.5).validate()
            Traceback (most recent call last):
            ...
            tl_taskmap.errors.ConfigError: k must be in (0, 1] (a fraction: 0.1 = top 10%), got 1.5
        """
        _check_types(self)
        _check(isinstance(self.k, (int, float)) and not isinstance(self.k, bool) and 0 < self.k <= 1,
               f"k must be in (0, 1] (a fraction: 0.1 = top 10%), got {self.k!r}")
        for name, low in (("seeds", 1), ("examples", 8), ("batch_size", 1), ("train_controls", 0), ("control_steps", 1), ("seed", 0)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"{name} must be an integer ≥ {low}, got {value!r}")
        _check(self.control_lr is None or (isinstance(self.control_lr, (int, float)) and not isinstance(self.control_lr, bool)
               and math.isfinite(self.control_lr) and self.control_lr > 0), f"control_lr must be positive and finite (e.g. 1e-4), got {self.control_lr!r}")
        _check_layer_map_fields(self)
        for name, options in (("dtype", DTYPES), ("reduce", REDUCTIONS), ("ablation_mode", ABLATION_MODES), ("control_neurons", CONTROL_NEURONS)):
            _check(getattr(self, name) in options, f"{name} must be one of {options}, got {getattr(self, name)!r}")
        _check(isinstance(self.heads, bool), f"heads must be true or false, got {self.heads!r}")
        _check(isinstance(self.selection, (list, tuple)) and all(m in SELECTION_METHODS for m in self.selection)
               and len(set(self.selection)) == len(self.selection),
               f"selection must be distinct methods among {SELECTION_METHODS}, got {self.selection!r}")
        _check_device(self.device)
        _check_sites(self.sites)
        for name in ("model", "second_model"):
            if getattr(self, name) is not None:
                _check_model_source(getattr(self, name), name)
        for task, folder in self.control_models.items():
            path = Path(folder).expanduser()
            _check((path / "manifest.json").is_file() and (path / "weights.safetensors").is_file(),
                   f"control model for {task!r}: {folder} is not a saved control model (needs manifest.json and weights.safetensors)")
        for spec in self.tasks:
            _check_task_spec(spec)
        if self.tasks:
            for name in ("template", "target_template"):
                _check("{" in getattr(self, name), f"{name} {getattr(self, name)!r} has no {{column}} placeholder, e.g. '{{input}}'")
            _check(not (self.options and self.options_field), "give shared options or an options_field, not both")
        repeated = sorted({n for n in self.task_names if self.task_names.count(n) > 1})
        _check(not repeated, f"task_names repeats {repeated}: name each task once (--task-names given twice?)")
        out = Path(self.out).expanduser()
        _check(not out.exists() or out.is_dir(), f"out={self.out!r} exists and is not a folder")
        _check_writable_out(out, self.out)
        return self

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MapConfig":
        """Build from a dict (e.g. a ``config.json``); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration must be a JSON object of MapConfig fields, got a {type(data).__name__}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; valid keys: {sorted(names)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MapConfig":
        """Read a ``config.json`` written by a previous run.

        Example:
            >>> cfg = MapConfig.load("taskmap-report/config.json")   # doctest: +SKIP
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the configuration {path}: {err}") from None
        return cls.from_dict(data)

    def parts(self, *names: str) -> dict[str, Any]:
        """The named fields, for a stage hash."""
        return {n: getattr(self, n) for n in names}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


#: The JSON type of every non-numeric field (numeric fields are checked with their ranges).
_STR_FIELDS = ("out", "control_neurons", "template", "target_template", "split", "reduce", "ablation_mode", "device", "dtype")
_OPTIONAL_STR_FIELDS = ("model", "second_model", "options_field")
_STR_LIST_FIELDS = ("tasks", "task_names", "options", "sites")
_BOOL_FIELDS = ("save_controls", "per_layer")


def _check_types(config: "MapConfig") -> None:
    """Each field has its JSON type (a ``--config`` file can hold anything): a clear error, never a character-by-character list."""
    for name in _STR_FIELDS:
        value = getattr(config, name)
        _check(isinstance(value, str), f"{name} must be a string, got {type(value).__name__} {value!r}")
    for name in _OPTIONAL_STR_FIELDS:
        value = getattr(config, name)
        _check(value is None or isinstance(value, str), f"{name} must be a string or null, got {type(value).__name__} {value!r}")
    for name in _STR_LIST_FIELDS:
        value = getattr(config, name)
        _check(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
               f"{name} must be a list of strings, e.g. [\"a\", \"b\"], got {type(value).__name__} {value!r}")
    for name in _BOOL_FIELDS:
        value = getattr(config, name)
        _check(isinstance(value, bool), f"{name} must be true or false, got {type(value).__name__} {value!r}")
    _check(isinstance(config.control_models, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in config.control_models.items()),
           f"control_models must map task names to folders, e.g. {{\"task\": \"controls/task\"}}, got {config.control_models!r}")


def _check_writable_out(out: Path, given: str) -> None:
    """The output folder can be created and written: its nearest existing ancestor is a writable folder."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _check(existing.is_dir(), f"out={given!r} cannot be created: {existing} is a file, not a folder; choose another --out")
    _check(os.access(existing, os.W_OK | os.X_OK), f"out={given!r}: {existing} is not writable (read-only?); choose a writable --out")


MULTITASK_MODES = ("auto", "train", "off")


def _check_layer_map_fields(config: MapConfig) -> None:
    _check(isinstance(config.null_controls, bool), f"null_controls must be true or false, got {config.null_controls!r}")
    for name, low in (("layer_map_boot", 100), ("multitask_steps", 1)):
        value = getattr(config, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"{name} must be an integer ≥ {low}, got {value!r}")
    _check(isinstance(config.multitask_lr, (int, float)) and config.multitask_lr > 0, f"multitask_lr must be positive, got {config.multitask_lr!r}")
    _check(config.multitask in MULTITASK_MODES, f"multitask must be one of {MULTITASK_MODES}, got {config.multitask!r}")
    _check(isinstance(config.multitask_held_out, (list, tuple)) and all(isinstance(t, str) for t in config.multitask_held_out),
           f"multitask_held_out must be a list of task names, got {config.multitask_held_out!r}")
    if config.multitask_cache is not None:
        path = Path(config.multitask_cache).expanduser()
        _check(not path.exists() or path.is_dir(), f"multitask_cache={config.multitask_cache!r} exists and is not a folder")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {device!r} is not a torch device name (cpu, cuda, cuda:1, mps): {err}") from None
    if dev.type == "cuda":
        _check(torch.cuda.is_available(), f"device {device!r} asked for, but torch sees no CUDA device")
        _check(dev.index is None or dev.index < torch.cuda.device_count(), f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps":
        _check(torch.backends.mps.is_available(), f"device {device!r} asked for, but MPS is not available")
    else:
        _check(dev.type == "cpu", f"device {device!r}: use cpu, cuda, cuda:N or mps")


def _check_sites(sites: Sequence[str]) -> None:
    from tl_taskmap.models import SITE_ALIASES, SITE_TEMPLATES

    _check(isinstance(sites, (list, tuple)) and len(sites) > 0, "sites: name at least one site, e.g. resid_post")
    valid = sorted(set(SITE_TEMPLATES) | set(SITE_ALIASES))
    for site in sites:
        _check(isinstance(site, str) and (site in valid or re.fullmatch(r"blocks\.\d+\.[\w.]+", site) is not None),
               f"unknown site {site!r}; valid sites: {valid} (or a full hook name such as blocks.3.hook_resid_post)")


def _check_model_source(source: str, what: str) -> None:
    path = Path(source).expanduser()
    if path.exists():
        _check(path.is_dir() and (path / "config.json").is_file(), f"{what}={source!r} is not a Hugging Face model folder (no config.json)")
        return
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
    _check(not looks_like_path and _HUB_NAME.match(source) is not None,
           f"{what}={source!r}: no such folder, and not a hub name like 'org/model'")


def _check_task_spec(spec: str) -> None:
    if spec.startswith("hf:"):
        _check(_HUB_NAME.match(spec[3:]) is not None, f"task {spec!r}: write a datasets hub name as hf:NAME, e.g. hf:stanfordnlp/imdb")
        return
    if spec.startswith(("builtin:", "bigbench:")):  # names are checked when the tasks load (before any model)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        from tl_taskmap.suite import default_task_names

        _check("/" not in spec and not path.suffix, f"task file {spec!r} does not exist (use hf:NAME for a datasets hub name)")

        _check(spec in default_task_names(), f"task {spec!r} is neither a file nor a built-in task; built-in tasks: "
                                             f"{default_task_names()} (use hf:NAME for a datasets hub name)")
        return
    _check(path.is_dir() and (path / "task.json").is_file() or path.suffix in TASK_FILE_SUFFIXES + (".yaml", ".yml"),
           f"task file {spec!r}: expected one of {TASK_FILE_SUFFIXES}, a .yaml/.json task spec or a BIG-bench folder with task.json")


# ---------------------------------------------------------------------------------------- tasks
#: Tasks of the built-in suite that a default run maps: three clusters (sentiment, semantics,
#: morphology), two multiple-choice tasks and one generation task, all well above chance for the
#: embedded model (so ablation has something to remove) and cheap to score (evaluation cost grows with
#: answer options × examples, and generation decodes token by token). The ablation matrix costs
#: ``(1 + tasks + seeds) × tasks`` task evaluations, so each extra task adds minutes on a CPU;
#: ``--task-names`` picks others (``tl_taskmap.suite.default_task_names()`` lists all).
DEFAULT_TASKS: tuple[str, ...] = ("word_sentiment", "phrase_relatedness", "past_tense")


def load_suite(config: MapConfig, tasks: Any = None) -> tuple[Any, Any]:
    """The configured tasks as ``(selection, evaluation)`` suites: ``examples`` per task, split in half.

    ``tasks`` (a Task list or TaskSuite built in Python) replaces ``config.tasks`` and the built-in suite.

    ``config.task_names`` (built-in) and ``config.tasks`` (files, built-in names, ``hf:`` names and YAML/JSON
    task specs, see :mod:`tl_taskmap.task_spec`) mix; with neither, :data:`DEFAULT_TASKS`. One task is enough
    (the report then leaves out the comparisons between tasks). ``task.meta["rows_available"]`` keeps each
    source's row count so the run can say how many rows ``examples`` left out.

    Raises :class:`ConfigError` (before any model is loaded) for unknown task names (listing the
    available ones), unreadable specs, or tasks with fewer than 4 examples.

    Example:
        >>> selection, evaluation = load_suite(MapConfig(examples=16))   # doctest: +SKIP
        >>> len(selection[0]), len(evaluation[0])                        # doctest: +SKIP
        (8, 8)
    """
    from tl_taskmap import task_spec

    if tasks is not None:
        from tl_taskmap.tasks import as_suite

        suite = as_suite(tasks)
    else:
        try:
            if config.tasks or config.task_names:
                entries = task_spec.entries_from_config(config.tasks, config.task_names)
            else:
                from tl_taskmap.suite import default_task_names

                available = default_task_names()
                names = [n for n in DEFAULT_TASKS if n in available] or available
                entries = [task_spec.TaskEntry("builtin", n) for n in names]
            defaults = task_spec.Defaults(template=config.template, target_template=config.target_template, options=tuple(config.options),
                                          options_field=config.options_field, split=config.split, seed=config.seed,
                                          max_examples=config.examples)
            suite = task_spec.load_entries(entries, defaults)
        except task_spec.TaskSpecError as err:
            raise ConfigError(str(err)) from None
    from tl_taskmap.task_checks import check_suite, split_suite

    suite = check_suite(suite)
    _check(len(suite) >= 1, "a task map needs at least one task")
    small = [f"{t.name} ({len(t)})" for t in suite if len(t) < 8]
    _check(not small, f"tasks need at least 8 examples (4 to select neurons, 4 to measure: debiased CKA needs 4); too few: {small}")
    return split_suite(suite.subset(config.examples, seed=config.seed), config.seed)
