"""Tasks: named sets of examples (prompt, target completion, optional answer options) with a cluster.

Every analysis takes a :class:`Task` or a :class:`TaskSuite`. :meth:`Task.from_lists` builds one from
plain Python lists; :mod:`tl_taskmap.bigbench` loads BIG-bench JSON, :func:`tl_taskmap.suite.load_dataset_task`
loads 🤗 ``datasets`` names and local files, and :func:`tl_taskmap.suite.default_suite` is the built-in
offline suite.

Example:
    >>> from tl_taskmap.tasks import Task
    >>> task = Task.from_lists("sentiment", ["Review: great film. Sentiment:", "Review: awful. Sentiment:"],
    ...                        [" positive", " negative"], options=[" positive", " negative"], cluster="sentiment")
    >>> task
    Task('sentiment', cluster='sentiment', n_examples=2, metric='accuracy', options=2)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

Metric = Literal["accuracy", "exact_match", "rouge_l"]


@dataclass(frozen=True)
class Example:
    """One example: the prompt, the correct completion, and the answer options (if multiple choice).

    ``target`` is the text appended to the prompt that the model should produce (with its leading
    space, e.g. ``" positive"``); for multiple choice it is one of ``options``.
    """

    prompt: str
    target: str
    options: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.target, str):
            raise TypeError("Example prompt and target must be strings")
        if self.target == "":
            raise ValueError(f"example with prompt {self.prompt[:60]!r} has an empty target: every example needs an answer")
        if self.options is not None:
            object.__setattr__(self, "options", tuple(self.options))
            if self.target not in self.options:
                raise ValueError(f"target {self.target!r} is not among the options {self.options}")

    @property
    def label(self) -> Optional[int]:
        """Index of the target among the options (None for generation)."""
        return None if self.options is None else self.options.index(self.target)


@dataclass
class Task:
    """A named task: examples, a cluster (task family) and the metric used to score it.

    Attributes:
        name: Unique name, e.g. ``"sst2"``.
        examples: The examples, in a fixed order.
        cluster: Task family used for grouping in plots (``"sentiment"``, ``"nli"``, ...).
        metric: ``"accuracy"`` (choose among options by likelihood), ``"exact_match"`` or ``"rouge_l"``
            (greedy generation). Defaults to accuracy when every example has options.
        meta: Free-form JSON-able provenance (source file, template, chat template used, ...).
    """

    name: str
    examples: list[Example]
    cluster: str = "misc"
    metric: Optional[Metric] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.examples = list(self.examples)
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples: a task needs at least one (prompt, target) example")
        if self.metric is None:
            self.metric = "accuracy" if all(e.options for e in self.examples) else "exact_match"
        if self.metric == "accuracy" and not all(e.options for e in self.examples):
            raise ValueError(f"task {self.name!r} uses accuracy but some examples have no options; use 'exact_match' or 'rouge_l'")
        if self.metric not in ("accuracy", "exact_match", "rouge_l"):
            raise ValueError(f"unknown metric {self.metric!r}: use 'accuracy', 'exact_match' or 'rouge_l'")

    @classmethod
    def from_lists(
        cls,
        name: str,
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        options: Optional[Sequence[str] | Sequence[Sequence[str]]] = None,
        cluster: str = "misc",
        metric: Optional[Metric] = None,
    ) -> "Task":
        """Build a task from plain lists; ``options`` is one list for all examples or one per example."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: they must pair up one to one")
        per_example: list[Optional[tuple[str, ...]]]
        if options is None:
            per_example = [None] * len(prompts)
        elif options and isinstance(options[0], str):
            per_example = [tuple(options)] * len(prompts)  # type: ignore[arg-type]
        else:
            if len(options) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
            per_example = [tuple(o) for o in options]  # type: ignore[misc]
        examples = [Example(p, t, o) for p, t, o in zip(prompts, targets, per_example)]
        return cls(name, examples, cluster=cluster, metric=metric)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    @property
    def targets(self) -> list[str]:
        return [e.target for e in self.examples]

    @property
    def n_options(self) -> Optional[int]:
        """Number of options if all examples share the same count, else None."""
        counts = {len(e.options) for e in self.examples if e.options}
        return counts.pop() if len(counts) == 1 and self.metric == "accuracy" else None

    @property
    def chance(self) -> Optional[float]:
        """Expected accuracy of guessing uniformly among each example's options."""
        if self.metric != "accuracy":
            return None
        return sum(1 / len(e.options) for e in self.examples) / len(self.examples)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        opts = f", options={self.n_options}" if self.n_options else ""
        return f"Task({self.name!r}, cluster={self.cluster!r}, n_examples={len(self)}, metric={self.metric!r}{opts})"

    def subset(self, n: Optional[int] = None, *, seed: int = 0) -> "Task":
        """The first ``n`` examples after a seeded shuffle (all of them shuffled when n is None)."""
        order = list(range(len(self.examples)))
        random.Random(seed).shuffle(order)
        chosen = order[: n if n is not None else len(order)]
        return replace(self, examples=[self.examples[i] for i in chosen], meta={**self.meta, "subset_seed": seed})

    def split(self, train_fraction: float = 0.5, *, seed: int = 0) -> tuple["Task", "Task"]:
        """A fixed, seeded train/eval split: ``(train, eval)``, both non-empty."""
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        if len(self) < 2:
            raise ValueError(f"task {self.name!r} has {len(self)} example; a split needs at least 2")
        shuffled = self.subset(seed=seed).examples
        k = min(max(1, round(train_fraction * len(shuffled))), len(shuffled) - 1)
        return (
            replace(self, examples=shuffled[:k], meta={**self.meta, "split": "train", "split_seed": seed}),
            replace(self, examples=shuffled[k:], meta={**self.meta, "split": "eval", "split_seed": seed}),
        )

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(
            {"task": self.name, "cluster": self.cluster, "prompt": self.prompts, "target": self.targets,
             "options": [list(e.options) if e.options else None for e in self.examples]}
        )


class TaskSuite(Sequence[Task]):
    """An ordered collection of uniquely named tasks.

    Example:
        >>> suite = TaskSuite([task_a, task_b])   # doctest: +SKIP
        >>> suite["sst2"], suite.clusters          # doctest: +SKIP
    """

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("a TaskSuite needs at least one task")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {dupes}")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for t in self.tasks:
                if t.name == key:
                    return t
            raise KeyError(f"no task {key!r}; tasks: {self.names}")
        if isinstance(key, slice):
            return TaskSuite(self.tasks[key])
        return self.tasks[key]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def clusters(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.tasks:
            out.setdefault(t.cluster, []).append(t.name)
        return out

    def subset(self, n: Optional[int] = None, *, seed: int = 0) -> "TaskSuite":
        return TaskSuite([t.subset(n, seed=seed) for t in self.tasks])

    def split(self, train_fraction: float = 0.5, *, seed: int = 0) -> tuple["TaskSuite", "TaskSuite"]:
        pairs = [t.split(train_fraction, seed=seed) for t in self.tasks]
        return TaskSuite([p[0] for p in pairs]), TaskSuite([p[1] for p in pairs])

    def select(self, names: Sequence[str]) -> "TaskSuite":
        return TaskSuite([self[n] for n in names])

    def __repr__(self) -> str:
        return f"TaskSuite({len(self)} tasks, clusters={ {c: len(v) for c, v in self.clusters.items()} })"

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(
            [{"task": t.name, "cluster": t.cluster, "n_examples": len(t), "metric": t.metric, "chance": t.chance} for t in self.tasks]
        )


def as_suite(tasks: Task | Sequence[Task] | Mapping[str, Task] | TaskSuite) -> TaskSuite:
    """Accept one task, a list, a mapping or a suite."""
    if isinstance(tasks, TaskSuite):
        return tasks
    if isinstance(tasks, Task):
        return TaskSuite([tasks])
    if isinstance(tasks, Mapping):
        return TaskSuite(list(tasks.values()))
    return TaskSuite(list(tasks))


# ---------------------------------------------------------------------------------------- validation
_SCALARS = (str, int, float, bool)


def validate_row(row: Mapping[str, Any], index: int, where: str, fields: Sequence[str], options_field: Optional[str] = None) -> None:
    """Raise ValueError unless the row has a value of a plain type for every template field and, if
    ``options_field`` is given, a list of at least two options there.

    A missing column read from a jsonl file arrives as ``None`` (it would become the prompt
    ``"None"``); an options column holding one string would be split into characters.

    Example:
        >>> validate_row({"text": "good", "label": 1}, 0, "reviews.jsonl", ["text", "label"])
        >>> validate_row({"text": None}, 3, "reviews.jsonl", ["text"])
        Traceback (most recent call last):
        ...
        ValueError: reviews.jsonl row 3: column 'text' is missing or null; every row needs it
    """
    for name in fields:
        value = row.get(name)
        if value is None or isinstance(value, float) and value != value:  # null, or NaN (an empty csv cell)
            raise ValueError(f"{where} row {index}: column {name!r} is missing or null; every row needs it")
        if not isinstance(value, _SCALARS):
            raise ValueError(f"{where} row {index}: column {name!r} holds a {type(value).__name__} ({str(value)[:60]!r}); "
                             f"templates need text or numbers")
    if options_field is not None:
        options = row.get(options_field)
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, _SCALARS) for o in options):
            raise ValueError(f"{where} row {index}: column {options_field!r} must be a list of answer options, e.g. "
                             f"[\" yes\", \" no\"], got {type(options).__name__} {str(options)[:60]!r}")
        if len(options) < 2:
            raise ValueError(f"{where} row {index}: column {options_field!r} has {len(options)} option(s); multiple choice needs at least 2")


def validate_task(task: Task) -> Task:
    """Raise ValueError for a task that would score something meaningless: multiple choice with fewer than
    two options on some example (accuracy 1.0 by construction). Returns the task.

    Example:
        >>> validate_task(Task.from_lists("t", ["q"], [" a"], options=[" a"]))
        Traceback (most recent call last):
        ...
        ValueError: task 't': 1 of 1 examples have a single answer option (first prompt: 'q'); multiple choice needs at least 2 options, or use generation (no options)
    """
    single = [e for e in task.examples if e.options is not None and len(set(e.options)) < 2]
    if single:
        raise ValueError(f"task {task.name!r}: {len(single)} of {len(task)} examples have a single answer option "
                         f"(first prompt: {single[0].prompt[:60]!r}); multiple choice needs at least 2 options, or use generation (no options)")
    return task


def repeated_prompts(task: Task) -> int:
    """How many examples repeat the prompt of an earlier one.

    Example:
        >>> repeated_prompts(Task.from_lists("t", ["q", "q", "r"], [" a", " a", " b"]))
        1
    """
    return len(task) - len({e.prompt for e in task.examples})


def split_keeping_prompts_together(task: Task, train_fraction: float = 0.5, *, seed: int = 0) -> tuple[Task, Task]:
    """:meth:`Task.split`, except that every copy of a repeated prompt lands in the same half.

    A prompt in both halves would let neurons be chosen on the examples that measure them. Without
    repeated prompts the halves are exactly those of :meth:`Task.split`; with them, whole groups
    of equal prompts go to the first half (in the seeded order) until it holds its share.

    Raises:
        ValueError: the task has a single distinct prompt (nothing to split).

    Example:
        >>> task = Task.from_lists("t", ["q", "q", "r", "s"], [" a", " a", " b", " c"])
        >>> first, second = split_keeping_prompts_together(task, seed=0)
        >>> set(first.prompts) & set(second.prompts)
        set()
    """
    if repeated_prompts(task) == 0:
        return task.split(train_fraction, seed=seed)
    shuffled = task.subset(seed=seed).examples
    k = min(max(1, round(train_fraction * len(shuffled))), len(shuffled) - 1)
    groups: dict[str, list[Example]] = {}
    for example in shuffled:
        groups.setdefault(example.prompt, []).append(example)
    if len(groups) < 2:
        raise ValueError(f"task {task.name!r}: all {len(task)} examples share one prompt; a selection/evaluation split needs at least 2 distinct prompts")
    first: list[Example] = []
    ordered = list(groups.values())
    taken = 0
    while taken < len(ordered) - 1 and len(first) < k:
        first.extend(ordered[taken])
        taken += 1
    second = [e for group in ordered[taken:] for e in group]
    return (
        replace(task, examples=first, meta={**task.meta, "split": "train", "split_seed": seed}),
        replace(task, examples=second, meta={**task.meta, "split": "eval", "split_seed": seed}),
    )
