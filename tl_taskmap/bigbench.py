"""BIG-bench tasks from their public JSON format, read from the PyPI sdist or from a folder.

A BIG-bench ``task.json`` holds ``examples``, each with an ``input`` and either ``target_scores``
(multiple choice: option → score, the highest-scoring option is the answer) or ``target``
(generation: a string or a list of acceptable strings, the first is used). The sdist
``bigbench==1.0.0`` ships every task under ``bigbench/benchmark_tasks/<name>/task.json``;
:func:`extract_bigbench_tasks` copies only the named ones out of the archive in one pass, without
installing BIG-bench or its dependencies.

Example:
    >>> from tl_taskmap.bigbench import load_bigbench_task
    >>> task = load_bigbench_task("arithmetic/1_digit_addition", cluster="arithmetic", max_examples=32)  # doctest: +SKIP
    >>> task.examples[0].prompt, task.examples[0].target   # doctest: +SKIP
    ('Q: What is 4 plus 3?\\nA:', ' 7')
"""

from __future__ import annotations

import json
import os
import string
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tl_taskmap.embedded import cache_root
from tl_taskmap.tasks import Example, Task

BIGBENCH_VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
DOWNLOAD_COMMAND = f"pip download --no-deps --no-binary :all: bigbench=={BIGBENCH_VERSION}"
TASKS_DIR_IN_ARCHIVE = "bigbench/benchmark_tasks/"

#: Plain question/answer prompt.
QA_TEMPLATE = "Q: {input}\nA:"
#: The task's own instruction prefix, then the plain question/answer prompt.
QA_WITH_PREFIX_TEMPLATE = "{task_prefix}Q: {input}\nA:"
#: The task's own prompt format (its ``task_prefix``, ``example_input_prefix``, ``example_output_prefix``).
NATIVE_TEMPLATE = "{task_prefix}{input_prefix}{input}{output_prefix}"
#: Fields a template may use; ``{input}`` is required.
TEMPLATE_FIELDS = ("input", "task_prefix", "input_prefix", "output_prefix", "options")


class BigBenchFormatError(ValueError):
    """A task file or template that cannot make a task."""


def bigbench_dir(cache_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """Where the BIG-bench archive and the extracted task files live in the cache."""
    return cache_root(cache_dir) / "bigbench"


def default_archive(cache_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """Path of the cached ``bigbench-1.0.0.tar.gz`` (it may not exist yet: see ``python -m tl_taskmap.setup_assets``)."""
    return bigbench_dir(cache_dir) / ARCHIVE_NAME


def extracted_dir(cache_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """Folder of task files extracted from the archive: ``<dir>/<task name>/task.json``."""
    return bigbench_dir(cache_dir) / "tasks"


def _member_task_name(member_name: str) -> Optional[str]:
    """``'bigbench-1.0.0/bigbench/benchmark_tasks/a/b/task.json'`` → ``'a/b'``."""
    if not member_name.endswith("/task.json") or TASKS_DIR_IN_ARCHIVE not in member_name:
        return None
    return member_name.split(TASKS_DIR_IN_ARCHIVE, 1)[1][: -len("/task.json")]


def extract_bigbench_tasks(
    names: Iterable[str], archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, overwrite: bool = False
) -> dict[str, Path]:
    """Copy the named tasks' ``task.json`` out of the sdist archive in one streaming pass.

    Files already in ``dest`` are kept (unless ``overwrite``); each new file is written atomically.

    Returns:
        ``{name: path}`` for every requested task.

    Raises:
        FileNotFoundError: the archive is missing, or some names are not in it (they are listed).

    Example:
        >>> extract_bigbench_tasks(["arithmetic/1_digit_addition"], default_archive(), extracted_dir())  # doctest: +SKIP
        {'arithmetic/1_digit_addition': PosixPath('.../tasks/arithmetic/1_digit_addition/task.json')}
    """
    dest = Path(dest)
    wanted = {n.strip("/"): dest / n.strip("/") / "task.json" for n in names}
    todo = {n for n, p in wanted.items() if overwrite or not p.is_file()}
    if not todo:
        return wanted
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"no BIG-bench archive at {archive}; get it with `{DOWNLOAD_COMMAND}` or `python -m tl_taskmap.setup_assets`")
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # streaming: a .tar.gz has no index, so stop as soon as all are found
            name = _member_task_name(member.name)
            if name not in todo or not member.isfile():
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            target = wanted[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".task-{uuid.uuid4().hex[:8]}.json")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            todo.discard(name)
            if not todo:
                break
    if todo:
        raise FileNotFoundError(f"tasks not found in {archive.name}: {sorted(todo)} (names look like 'arithmetic/1_digit_addition')")
    return wanted


def list_archive_tasks(archive: str | os.PathLike[str]) -> list[str]:
    """Names of all tasks in a BIG-bench archive (one pass over it, ~15 s for the sdist)."""
    with tarfile.open(archive, "r:*") as tar:
        return sorted(n for n in (_member_task_name(m.name) for m in tar) if n)


def _read_task_json(path_or_name: str | os.PathLike[str], archive: Optional[str | os.PathLike[str]]) -> tuple[dict[str, Any], str, str]:
    """(parsed json, task name, where it came from)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        path = path / "task.json"
    if path.is_file():
        return _parse_json(path.read_bytes(), str(path)), _name_from_path(path), str(path)
    name = str(path_or_name).strip("/")
    sources: list[Path] = [Path(archive).expanduser()] if archive is not None else [extracted_dir(), default_archive()]
    for source in sources:
        if source.is_dir():
            for candidate in (source / name / "task.json", source / TASKS_DIR_IN_ARCHIVE / name / "task.json"):
                if candidate.is_file():
                    return _parse_json(candidate.read_bytes(), str(candidate)), name, str(candidate)
        elif source.is_file():
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    if _member_task_name(member.name) == name and member.isfile():
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        return _parse_json(data, f"{source}:{member.name}"), name, f"{source}:{member.name}"
    where = ", ".join(str(s) for s in sources)
    raise FileNotFoundError(
        f"no BIG-bench task {name!r} as a file or in {where}. Pass a task.json path, a folder, or a task name with "
        f"archive=...; `python -m tl_taskmap.setup_assets` fetches the archive."
    )


def _name_from_path(path: Path) -> str:
    """Task name of a task.json path: the part after ``benchmark_tasks/`` or the cache's ``tasks/``."""
    if path.name != "task.json":
        return path.stem
    posix = path.resolve().parent.as_posix() + "/"
    for root in ("/" + TASKS_DIR_IN_ARCHIVE, extracted_dir().resolve().as_posix() + "/"):
        if root in posix:
            return posix.split(root, 1)[1].rstrip("/")
    return path.parent.name


def _parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except ValueError as err:
        raise BigBenchFormatError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise BigBenchFormatError(f"{where} holds a JSON {type(parsed).__name__}, expected an object with 'examples'")
    return parsed


def check_template(template: str) -> None:
    """Raise a clear error unless ``template`` has an ``{input}`` placeholder and only known fields.

    Example:
        >>> check_template("Q: {input}\\nA:")
        >>> check_template("Q: {question}")
        Traceback (most recent call last):
        ...
        tl_taskmap.bigbench.BigBenchFormatError: template 'Q: {question}' has no {input} placeholder (it uses ['question']; allowed: ['input', 'task_prefix', 'input_prefix', 'output_prefix', 'options'])
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise BigBenchFormatError(f"template {template!r} is not a valid format string: {err}") from None
    unknown = sorted({f for f in fields if f not in TEMPLATE_FIELDS})
    if "input" not in fields:
        raise BigBenchFormatError(f"template {template!r} has no {{input}} placeholder (it uses {sorted(set(fields))}; allowed: {list(TEMPLATE_FIELDS)})")
    if unknown:
        raise BigBenchFormatError(f"template {template!r} uses unknown fields {unknown}; allowed: {list(TEMPLATE_FIELDS)}")


def _target_of(example: dict[str, Any]) -> Optional[str]:
    target = example.get("target")
    if isinstance(target, list):
        target = next((t for t in target if isinstance(t, str) and t.strip()), None)
    return target if isinstance(target, str) and target.strip() else None


def _check_target_scores(raw: list[Any], source: str) -> None:
    """Every ``target_scores`` is an object of option → number (strings would compare as text)."""
    for i, e in enumerate(raw):
        scores = e.get("target_scores")
        if scores is None:
            continue
        if not isinstance(scores, dict):
            raise BigBenchFormatError(f"{source}: example {i} has 'target_scores' of type {type(scores).__name__}; "
                                      f"expected an object of option → score, e.g. {{\"yes\": 1, \"no\": 0}}")
        bad = {k: v for k, v in scores.items() if not isinstance(v, (int, float))}
        if bad:
            raise BigBenchFormatError(f"{source}: example {i} has non-numeric target_scores {dict(list(bad.items())[:3])}; "
                                      f"scores must be numbers, e.g. {{\"yes\": 1, \"no\": 0}}")


def load_bigbench_task(
    path_or_name: str | os.PathLike[str],
    *,
    archive: Optional[str | os.PathLike[str]] = None,
    cluster: Optional[str] = None,
    max_examples: Optional[int] = None,
    template: str = QA_TEMPLATE,
    answer_prefix: Optional[str] = None,
    name: Optional[str] = None,
    mode: Optional[str] = None,
    seed: int = 0,
) -> Task:
    """Load one BIG-bench task as a :class:`Task`.

    Args:
        path_or_name: A ``task.json``, a folder holding one, or a task name such as
            ``"arithmetic/1_digit_addition"`` looked up in ``archive`` (the sdist ``.tar.gz`` or an
            extracted folder; default: the tl_taskmap cache).
        archive: Where to look a task name up.
        cluster: Task family; defaults to the task's first BIG-bench keyword.
        max_examples: Keep this many examples, chosen by a ``seed``-ed shuffle (all when None).
        template: Prompt format with an ``{input}`` placeholder and optionally ``{task_prefix}``,
            ``{input_prefix}``, ``{output_prefix}`` (the task's own) and ``{options}`` (the answer
            options joined by ", "). Default: ``"Q: {input}\\nA:"``.
        answer_prefix: Put before every option/target; default ``""`` after a newline, else ``" "``.
        name: Task name (default: the BIG-bench name).
        mode: ``"choice"`` (needs ``target_scores``) or ``"generation"`` (``target``, or the top option);
            default: choice when every example has ``target_scores``.

    Raises:
        BigBenchFormatError: no examples, examples without targets, a bad template, or ties.

    Example:
        >>> task = load_bigbench_task("tests/data/task.json", template="{input} ->")   # doctest: +SKIP
    """
    check_template(template)
    data, bb_name, source = _read_task_json(path_or_name, archive)
    raw = data.get("examples")
    if not isinstance(raw, list) or not raw:
        raise BigBenchFormatError(f"{source} has no examples: a BIG-bench task needs a non-empty 'examples' list")
    no_target = [i for i, e in enumerate(raw) if not isinstance(e, dict) or not (e.get("target_scores") or _target_of(e))]
    if no_target:
        raise BigBenchFormatError(
            f"{source}: {len(no_target)} of {len(raw)} examples have neither 'target_scores' nor 'target' "
            f"(first indices {no_target[:5]}); every example needs an answer"
        )
    no_input = [i for i, e in enumerate(raw) if not isinstance(e.get("input"), str)]
    if no_input:
        raise BigBenchFormatError(f"{source}: examples {no_input[:5]} have no string 'input'")
    _check_target_scores(raw, source)
    if mode is None:
        mode = "choice" if all(e.get("target_scores") for e in raw) else "generation"
    if mode not in ("choice", "generation"):
        raise ValueError(f"mode must be 'choice' or 'generation', got {mode!r}")
    if mode == "choice" and not all(e.get("target_scores") for e in raw):
        raise BigBenchFormatError(f"{source}: mode='choice' needs 'target_scores' on every example")

    fields = {
        "task_prefix": data.get("task_prefix", "") or "",
        "input_prefix": data.get("example_input_prefix", "\nQ: "),
        "output_prefix": data.get("example_output_prefix", "\nA: "),
    }
    examples: list[Example] = []
    ambiguous = 0
    for e in raw:
        scores = e.get("target_scores") or {}
        options = [str(o) for o in scores]
        best = max(scores.values()) if scores else None
        if mode == "choice":
            winners = [o for o in options if scores[o] == best]
            if len(winners) != 1 or len(set(options)) != len(options):
                ambiguous += 1  # several top-scoring options: no single right answer to score
                continue
            answer = winners[0]
        else:
            answer = _target_of(e) or str(max(scores, key=scores.get))
        prompt = template.format(input=e["input"].strip(), options=", ".join(options), **fields)
        prompt = prompt.rstrip(" ")  # the answer prefix supplies the separating space
        prefix = answer_prefix if answer_prefix is not None else ("" if prompt.endswith("\n") else " ")
        if mode == "choice":
            examples.append(Example(prompt, prefix + answer, tuple(prefix + o for o in options)))
        else:
            examples.append(Example(prompt, prefix + answer.strip()))
    if not examples:
        raise BigBenchFormatError(f"{source}: all {len(raw)} examples have several top-scoring options; none has a single answer")
    keywords = [str(k) for k in data.get("keywords", [])]
    task = Task(
        name or bb_name,
        examples,
        cluster=cluster or (keywords[0] if keywords else "bigbench"),
        metric="accuracy" if mode == "choice" else "exact_match",
        meta={
            "source": "bigbench",
            "bigbench_task": bb_name,
            "file": source,
            "template": template,
            "answer_prefix": answer_prefix,
            "keywords": keywords,
            "n_available": len(examples),
            "n_skipped_ambiguous": ambiguous,
            "chat_template": False,
        },
    )
    if max_examples is not None and max_examples < len(task):
        task = task.subset(max_examples, seed=seed)
    return task


def load_bigbench_tasks(
    names: Sequence[str],
    *,
    archive: Optional[str | os.PathLike[str]] = None,
    dest: Optional[str | os.PathLike[str]] = None,
    **kwargs: Any,
) -> list[Task]:
    """Load several tasks by name; from an archive file, extract them all in one pass first.

    Args:
        names: BIG-bench task names.
        archive: The sdist ``.tar.gz`` or a folder (default: the cache's extracted tasks, then its archive).
        dest: Where to extract from an archive file (default: :func:`extracted_dir`).
        kwargs: Passed to :func:`load_bigbench_task` (template, max_examples, cluster, ...).

    Example:
        >>> tasks = load_bigbench_tasks(["arithmetic/1_digit_addition", "navigate"], max_examples=16)  # doctest: +SKIP
    """
    names = [n.strip("/") for n in names]
    source = Path(archive).expanduser() if archive is not None else None
    if source is None and not all((extracted_dir() / n / "task.json").is_file() for n in names) and default_archive().is_file():
        source = default_archive()
    if source is not None and source.is_file():
        paths = extract_bigbench_tasks(names, source, dest if dest is not None else extracted_dir())
        tasks = [load_bigbench_task(paths[n], **{"name": n, **kwargs}) for n in names]
        for n, task in zip(names, tasks):
            task.meta["bigbench_task"] = n  # a custom dest hides the name in the path
        return tasks
    return [load_bigbench_task(n, archive=source, **{"name": n, **kwargs}) for n in names]
