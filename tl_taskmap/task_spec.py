"""Task specs: a YAML or JSON file listing the tasks of a map, built-in and your own, each with its own format.

A spec is a mapping with a ``tasks`` list. Each entry names exactly one source and, optionally, how
to read it; entries that say nothing fall back to the command line's ``--template`` /
``--target-template`` / ``--options`` / ``--options-field`` / ``--split``::

    tasks:
      - builtin: word_sentiment                # a task of the built-in suite (`tl-taskmap tasks` lists them)
      - builtin: phrase_relatedness
      - name: reviews                          # your own file (.jsonl / .json / .csv / .parquet), relative to the spec
        file: data/reviews.jsonl
        template: "Review: {text}\\nSentiment:"
        target_template: "{label}"             # with options, an integer picks options[i]
        options: [" negative", " positive"]    # or options_field: a column holding each row's options
        cluster: sentiment
        metric: accuracy                       # accuracy | exact_match | rouge_l (default: accuracy with options)
      - bigbench: arithmetic/2_digit_addition  # any BIG-bench task name in the cached archive, or a task.json path
        template: "Q: {input}\\nA:"
        cluster: arithmetic
      - hf: glue/sst2                          # a 🤗 datasets hub name (needs internet)
        split: validation
        template: "{sentence}\\nSentiment:"
        target_template: "{label}"
        options: [" negative", " positive"]

A plain string entry is a shorthand: a built-in task name, ``hf:NAME``, ``bigbench:NAME`` or a file path.
The same strings work directly on the command line: ``tl-taskmap map --tasks word_sentiment reviews.jsonl``.

Example:
    >>> from tl_taskmap.task_spec import parse_entry
    >>> parse_entry({"file": "reviews.jsonl", "cluster": "sentiment"}).source
    'file'
    >>> parse_entry("word_sentiment").source
    'builtin'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

SOURCES = ("builtin", "file", "bigbench", "hf")
SPEC_SUFFIXES = (".yaml", ".yml")
_ENTRY_KEYS = {"name", "cluster", "metric", "template", "target_template", "options", "options_field", "split", *SOURCES}
METRICS = ("accuracy", "exact_match", "rouge_l")


class TaskSpecError(ValueError):
    """A task spec (file or entry) that cannot be read; the message names the entry and the fix."""


@dataclass(frozen=True)
class TaskEntry:
    """One task of a spec: where its rows come from and how to turn them into prompts and answers.

    Attributes:
        source: ``"builtin"``, ``"file"``, ``"bigbench"`` or ``"hf"``. ref: the name, path or hub name.
        name, cluster, metric: As in :class:`~tl_taskmap.tasks.Task` (None: the source's default).
        template, target_template, options, options_field, split: How to read rows (None: the run's default).

    Example:
        >>> TaskEntry("file", "reviews.jsonl", template="Review: {text}\\nSentiment:").label
        'reviews.jsonl'
    """

    source: str
    ref: str
    name: Optional[str] = None
    cluster: Optional[str] = None
    metric: Optional[str] = None
    template: Optional[str] = None
    target_template: Optional[str] = None
    options: Optional[tuple[str, ...]] = None
    options_field: Optional[str] = None
    split: Optional[str] = None
    where: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        """How the entry is named in messages."""
        return self.name or self.ref


def _fail(where: str, message: str) -> None:
    raise TaskSpecError(f"{where}: {message}" if where else message)


def parse_entry(entry: Any, *, base: Optional[Path] = None, where: str = "") -> TaskEntry:
    """One spec entry (a mapping or a shorthand string) as a :class:`TaskEntry`; file paths resolve against ``base``.

    Example:
        >>> parse_entry("hf:glue/sst2").ref
        'glue/sst2'
    """
    if isinstance(entry, str):
        return _parse_string(entry, base=base, where=where)
    if not isinstance(entry, Mapping):
        _fail(where, f"a task entry must be a mapping (e.g. {{builtin: word_sentiment}}) or a string, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        _fail(where, f"unknown keys {unknown}; a task entry takes {sorted(_ENTRY_KEYS)}")
    given = [s for s in SOURCES if s in entry]
    if len(given) != 1:
        _fail(where, f"name exactly one source among {list(SOURCES)}, got {given or 'none'}")
    source = given[0]
    ref = entry[source]
    if not isinstance(ref, str) or not ref:
        _fail(where, f"{source} must be a non-empty string, got {ref!r}")
    for key in ("name", "cluster", "template", "target_template", "options_field", "split"):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            _fail(where, f"{key} must be a string, got {entry[key]!r}")
    metric = entry.get("metric")
    if metric is not None and metric not in METRICS:
        _fail(where, f"metric must be one of {METRICS}, got {metric!r}")
    options = entry.get("options")
    if options is not None:
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options) or len(options) < 2:
            _fail(where, f"options must be a list of at least two strings, e.g. [' negative', ' positive'], got {options!r}")
        options = tuple(options)
    if options is not None and entry.get("options_field"):
        _fail(where, "give options or options_field, not both")
    if source == "file" or (source == "bigbench" and _looks_like_path(ref)):
        ref = str(_resolve(ref, base))
    return TaskEntry(source, ref, name=entry.get("name"), cluster=entry.get("cluster"), metric=metric,
                     template=entry.get("template"), target_template=entry.get("target_template"), options=options,
                     options_field=entry.get("options_field"), split=entry.get("split"), where=where)


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".json") or ref.startswith((".", "/", "~"))


def _resolve(ref: str, base: Optional[Path]) -> Path:
    path = Path(ref).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _parse_string(text: str, *, base: Optional[Path], where: str) -> TaskEntry:
    if text.startswith("hf:"):
        return TaskEntry("hf", text[3:], where=where)
    if text.startswith("bigbench:"):
        return TaskEntry("bigbench", text[len("bigbench:"):], where=where)
    if text.startswith("builtin:"):
        return TaskEntry("builtin", text[len("builtin:"):], where=where)
    path = _resolve(text, base)
    if path.exists():
        is_bigbench = path.name == "task.json" or (path / "task.json").is_file()
        return TaskEntry("bigbench" if is_bigbench else "file", str(path), where=where)
    from tl_taskmap.suite import default_task_names

    if text in default_task_names():
        return TaskEntry("builtin", text, where=where)
    _fail(where, f"{text!r} is neither a file nor a built-in task; built-in tasks: {default_task_names()} "
                 "(use hf:NAME for a datasets hub name, bigbench:NAME for a BIG-bench task)")
    raise AssertionError  # unreachable


def is_spec_file(text: str) -> bool:
    """Whether ``text`` names a task-spec file: ``.yaml`` / ``.yml``, or ``.json`` whose top level has a ``tasks`` list.

    Example:
        >>> is_spec_file("word_sentiment")
        False
    """
    path = Path(text).expanduser()
    if path.suffix.lower() in SPEC_SUFFIXES:
        return True
    if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > 10_000_000:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("tasks"), list)


def read_spec(path: str | Path) -> list[TaskEntry]:
    """The entries of a YAML or JSON spec file (relative file paths resolve against the spec's folder).

    Example:
        >>> entries = read_spec("tasks.yaml")   # doctest: +SKIP
        >>> [e.source for e in entries]          # doctest: +SKIP
        ['builtin', 'builtin', 'file']
    """
    path = Path(path).expanduser()
    if not path.is_file():
        _fail("", f"task spec {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in SPEC_SUFFIXES:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - yaml and json raise different types; both mean "unreadable"
        _fail(str(path), f"not valid {'YAML' if path.suffix.lower() in SPEC_SUFFIXES else 'JSON'}: {err}")
    if isinstance(data, list):
        data = {"tasks": data}
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        _fail(str(path), "a task spec needs a non-empty 'tasks' list, e.g.\ntasks:\n  - builtin: word_sentiment\n  - file: mine.jsonl")
    extra = sorted(set(data) - {"tasks"})
    if extra:
        _fail(str(path), f"unknown top-level keys {extra}; a spec holds only 'tasks'")
    return [parse_entry(e, base=path.parent, where=f"{path.name}, task {i + 1}") for i, e in enumerate(data["tasks"])]


def entries_from_config(tasks: Sequence[str], task_names: Sequence[str]) -> list[TaskEntry]:
    """The entries a run maps: ``task_names`` (built-in) first, then every ``tasks`` item (spec files expanded).

    Example:
        >>> [e.ref for e in entries_from_config([], ["word_sentiment"])]
        ['word_sentiment']
    """
    entries = [TaskEntry("builtin", n, where="--task-names") for n in task_names]
    for item in tasks:
        entries.extend(read_spec(item) if is_spec_file(item) else [parse_entry(item, where="--tasks")])
    return entries


def check_builtin_names(entries: Sequence[TaskEntry]) -> None:
    """Raise :class:`TaskSpecError` listing the available names when a built-in name is unknown."""
    from tl_taskmap.suite import default_task_names

    available = default_task_names()
    unknown = [e.ref for e in entries if e.source == "builtin" and e.ref not in available]
    if unknown:
        _fail("", f"unknown built-in task names {unknown}; available: {available} (`tl-taskmap tasks` describes them)")


# ---------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class Defaults:
    """The run-wide reading defaults (``MapConfig``'s template, target template, options, options field, split, seed)."""

    template: str = "{input}"
    target_template: str = "{target}"
    options: tuple[str, ...] = ()
    options_field: Optional[str] = None
    split: str = "train"
    seed: int = 0
    max_examples: Optional[int] = None


def load_entry(entry: TaskEntry, defaults: Defaults = Defaults()) -> Any:
    """Build the :class:`~tl_taskmap.tasks.Task` of one entry. All rows of own files are kept (the run subsets them).

    ``task.meta["rows_available"]`` records how many rows the source had, so a run can say how many it used.

    Example:
        >>> task = load_entry(TaskEntry("builtin", "word_sentiment"), Defaults(max_examples=16))   # doctest: +SKIP
    """
    from tl_taskmap.task_checks import hub_unavailable, quiet_datasets, validate_task_spec_result

    where = entry.where or entry.source
    if entry.source == "file" and Path(str(entry.ref)).expanduser().is_file() and Path(str(entry.ref)).expanduser().stat().st_size == 0:
        raise TaskSpecError(f"task file {entry.ref!r} is empty; give it one example per row (jsonl) or a BIG-bench 'examples' list")
    if entry.source == "hf":
        why = hub_unavailable()
        if why is not None:
            raise TaskSpecError(f"task {entry.label!r} needs the Hugging Face hub, but {why}; download the data set and pass it as a "
                                f"local .jsonl/.csv/.parquet file instead")
    try:
        with quiet_datasets():
            task = _load(entry, defaults)
    except TaskSpecError:
        raise
    except (ValueError, KeyError, TypeError) as err:  # a template naming a missing column, a bad target, ...
        raise TaskSpecError(f"task {entry.label!r} ({where}): {err}") from None
    except Exception as err:  # one wrapper for every loader: name the source and the problem; --debug shows the cause
        cause = err.__cause__ or err.__context__
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if cause is not None and str(cause) and str(cause) not in detail:
            detail += f" ({type(cause).__name__}: {str(cause)[:200]})"
        raise TaskSpecError(f"task {entry.label!r} cannot be loaded ({where}): {detail}; check that the file is complete and in its "
                            f"format (json/jsonl/csv/parquet, or a BIG-bench task.json); --debug shows the traceback") from err
    task = validate_task_spec_result(task, str(entry.ref))
    changes: dict[str, Any] = {}
    if entry.name:
        changes["name"] = entry.name
    if entry.cluster:
        changes["cluster"] = entry.cluster
    if changes:
        task = replace(task, **changes)
    return task


def _load(entry: TaskEntry, defaults: Defaults) -> Any:
    from tl_taskmap.tasks import Task

    if entry.source == "builtin":
        from tl_taskmap.suite import DEFAULT_TASKS, build_task

        check_builtin_names([entry])
        spec = next(s for s in DEFAULT_TASKS if s.name == entry.ref)
        if entry.template:
            spec = replace(spec, template=entry.template)
        task = build_task(spec, max_examples=defaults.max_examples, seed=defaults.seed)
        if entry.metric and entry.metric != task.metric:
            task = Task(task.name, task.examples, cluster=task.cluster, metric=entry.metric, meta=task.meta)  # type: ignore[arg-type]
        return task
    if entry.source == "bigbench":
        from tl_taskmap.bigbench import QA_TEMPLATE, load_bigbench_task

        template = entry.template or (defaults.template if defaults.template != "{input}" else QA_TEMPLATE)
        mode = {"accuracy": "choice", "exact_match": "generation", "rouge_l": "generation", None: None}[entry.metric]
        task = load_bigbench_task(entry.ref, template=template, mode=mode, cluster=entry.cluster)
        if entry.metric == "rouge_l":
            task = Task(task.name, task.examples, cluster=task.cluster, metric="rouge_l", meta=task.meta)
        task.meta["rows_available"] = len(task)
        return task
    from tl_taskmap.suite import load_dataset_task

    options: Any = entry.options_field or (list(entry.options) if entry.options else None)
    if options is None:  # field by field: what the entry leaves out comes from the run's defaults
        options = defaults.options_field or (list(defaults.options) if defaults.options else None)
    kwargs: dict[str, Any] = {"prompt": entry.template or defaults.template, "target": entry.target_template or defaults.target_template,
                              "options": options, "metric": entry.metric, "cluster": entry.cluster or "misc"}
    if entry.source == "hf":
        task = load_dataset_task(entry.ref, name=entry.name or entry.ref.rsplit("/", 1)[-1], split=entry.split or defaults.split, **kwargs)
    else:
        task = load_dataset_task(entry.ref, name=entry.name, **kwargs)
    task.meta["rows_available"] = len(task)
    return task


def load_entries(entries: Sequence[TaskEntry], defaults: Defaults = Defaults()) -> Any:
    """A :class:`~tl_taskmap.tasks.TaskSuite` of the entries, in order; repeated names are an error naming both entries.

    Example:
        >>> suite = load_entries(read_spec("tasks.yaml"), Defaults(max_examples=24))   # doctest: +SKIP
    """
    from tl_taskmap.tasks import TaskSuite

    check_builtin_names(entries)
    tasks = [load_entry(e, defaults) for e in entries]
    seen: dict[str, TaskEntry] = {}
    for entry, task in zip(entries, tasks):
        if task.name in seen:
            _fail("", f"two tasks are named {task.name!r} ({seen[task.name].where or seen[task.name].ref} and "
                      f"{entry.where or entry.ref}); give one a different `name:`")
        seen[task.name] = entry
    return TaskSuite(tasks)


def row_notes(selection: Any, evaluation: Any, examples: int) -> list[str]:
    """Plain-language notes for tasks whose source has more rows than the run uses (``--examples``).

    Example:
        >>> row_notes(selection, evaluation, 24)   # doctest: +SKIP
        ['reviews: 24 of its 32 rows are used (--examples 24, a seeded sample; raise --examples to use more).']
    """
    notes = []
    for sel, ev in zip(selection, evaluation):
        available = sel.meta.get("rows_available", sel.meta.get("n_available"))
        used = len(sel) + len(ev)
        if available is not None and available > used:
            notes.append(f"{sel.name}: {used} of its {available} rows are used (--examples {examples}, a seeded sample; "
                         f"raise --examples to use more).")
    return notes


# ---------------------------------------------------------------------------------------- listing
def builtin_table(*, sizes: bool = True) -> Any:
    """The built-in tasks as a DataFrame: name, cluster, metric, size (examples in the source), chance, zero_shot, control.

    ``zero_shot`` is the embedded SmolLM2-135M-Instruct's measured score on the task's default examples
    (:data:`tl_taskmap.suite.PROBE_N`, seed 0; see :mod:`tl_taskmap.zero_shot`). ``size`` needs the cached
    assets (``python -m tl_taskmap.setup_assets``); without them it is missing.

    Example:
        >>> builtin_table(sizes=False).loc[0, "name"]
        'addition_1digit'
    """
    import pandas as pd

    from tl_taskmap.suite import DEFAULT_TASKS, build_task

    rows = []
    for spec in DEFAULT_TASKS:
        size = None
        if sizes:
            try:
                task = build_task(spec, max_examples=None)
                size = int(task.meta.get("n_available", len(task)))
            except (FileNotFoundError, OSError):
                size = None
        rows.append({"name": spec.name, "cluster": spec.cluster, "metric": "exact_match" if spec.mode == "generation" else "accuracy",
                     "size": size, "chance": spec.chance, "zero_shot": spec.zero_shot, "shots": spec.shots, "control": spec.control,
                     "source": f"{spec.source}:{spec.ref}"})
    return pd.DataFrame(rows).astype({"size": "Int64"})
