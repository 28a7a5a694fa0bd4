"""Stage records of a task-map run: which finished stages a re-run can reuse, and a lock on the folder.

Each stage of :func:`tl_taskmap.report.map_model` is recorded in ``<out>/stages/<name>.json`` with a
hash of exactly what it depends on (configuration fields, task contents, the model's content,
upstream stage hashes), the files it wrote with the sha256 of each, and how long it took.

Integrity rules (see :class:`StageStore`): a stage computes into ``<out>/stages/.staging/<name>/``;
its old record is removed before its files are moved into place, and the new record is written
last. A record is reused only when its hash matches *and* every file it lists still has its
recorded sha256, so an interrupted run, a run with other settings killed half-way, or a file
changed by hand never passes as a finished stage. :class:`OutLock` keeps a second run off the
same folder.

Example:
    >>> from tl_taskmap.report.stages import StageStore
    >>> StageStore.digest({"k": 0.1}) == StageStore.digest({"k": 0.1})
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

from tl_taskmap import distributed
from tl_taskmap.memory import release_memory
from tl_taskmap.report.config import ConfigError
from tl_taskmap.report.layout import AblationLayout, ReportLayout
from tl_taskmap.state_io import FORMAT_VERSIONS, format_matches

__all__ = ["StageSpec", "StageStore", "OutLock", "OutLockedError", "check_stage_order", "file_digests", "write_json_atomic",
           "write_ablation", "RECORD_VERSION"]

#: Version of the stage record format (:data:`tl_taskmap.state_io.FORMAT_VERSIONS`); records of another version are recomputed.
RECORD_VERSION = FORMAT_VERSIONS["stage_record"]


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage, declared: what runs it and exactly what its record's hash depends on.

    The hash inputs are, in this order (later entries replace earlier ones of the same key): the hash of
    each stage in ``after`` under that stage's name; the model's identity (``model``); the tasks'
    contents (``tasks``); the configuration ``fields``; ``constants`` (a version of the stage's tests, say);
    and ``extra(context)`` for what a configuration field alone does not name (the content of a model
    folder it points to, say).

    Example:
        >>> spec = StageSpec("neurons", compute=print, fields=("k",), after=("relevance",), model=False, tasks=False)
        >>> class Config:
        ...     k = 0.1
        ...     def parts(self, *names): return {n: getattr(self, n) for n in names}
        >>> spec.inputs(Config(), model={"model": "m"}, tasks={"selection": "s"}, upstream={"relevance": {"hash": "abc"}}, context=None)
        {'relevance': 'abc', 'k': 0.1}
    """

    name: str
    compute: Callable[[Any], tuple[list[str], dict]]
    fields: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    model: bool = True
    tasks: bool = True
    constants: Mapping[str, Any] = field(default_factory=dict)
    extra: Optional[Callable[[Any], dict[str, Any]]] = None
    enabled: Callable[[Any], bool] = _always

    def inputs(self, config: Any, *, model: Mapping[str, Any], tasks: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]],
               context: Any) -> dict[str, Any]:
        """The stage's hash inputs (see the class docstring); ``upstream``: finished stages' records by name."""
        inputs = {name: upstream[name]["hash"] for name in self.after}
        inputs.update({**(model if self.model else {}), **(tasks if self.tasks else {}), **config.parts(*self.fields), **self.constants})
        if self.extra is not None:
            inputs.update(self.extra(context))
        return inputs


def check_stage_order(specs: Sequence[StageSpec]) -> None:
    """Raise ValueError unless stage names are unique and every stage comes after the stages it depends on.

    Example:
        >>> check_stage_order([StageSpec("b", print, after=("a",))])
        Traceback (most recent call last):
        ValueError: stage 'b' depends on 'a', which does not run before it
    """
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"stage {spec.name!r} is declared twice")
        for name in spec.after:
            if name not in seen:
                raise ValueError(f"stage {spec.name!r} depends on {name!r}, which does not run before it")
        seen.add(spec.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(root: str | os.PathLike, entries: list[str]) -> dict[str, str]:
    """``{relative file path: sha256}`` of ``entries`` under ``root``; a folder entry lists each file in it.

    Raises FileNotFoundError for an entry that does not exist.

    Example:
        >>> file_digests("report", ["baseline.csv"])   # doctest: +SKIP
        {'baseline.csv': '9f86d0...'}
    """
    root = Path(root)
    digests: dict[str, str] = {}
    for entry in entries:
        path = root / entry
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digests[file.relative_to(root).as_posix()] = _sha256(file)
        elif path.is_file():
            digests[Path(entry).as_posix()] = _sha256(path)
        else:
            raise FileNotFoundError(f"{path} is missing")
    return digests


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write_ablation(matrix: Any, layout: AblationLayout) -> tuple[Path, ...]:
    """Write an ablation matrix and its tables (cells, delta table, specificity) into ``layout``; returns the paths.

    Example:
        >>> write_ablation(matrix, ReportLayout("report").ablation)   # doctest: +SKIP
    """
    from tl_taskmap.neurons.ablation_effects import specificity

    layout.folder.mkdir(parents=True, exist_ok=True)
    matrix.save(layout.matrix)
    matrix.to_dataframe(per_seed=False).to_csv(layout.cells, index=False)
    matrix.delta_table().to_csv(layout.delta_table)
    specificity(matrix).to_csv(layout.specificity, index=False)
    return layout.files


def _move_into_place(staging: Path, root: Path, entries: list[str]) -> None:
    """Move everything under ``staging`` to the same place under ``root``; a listed folder replaces the old one whole."""
    for entry in entries:  # a listed folder (e.g. layers/stats) must not keep stale files of an older run
        target, source = root / entry, staging / entry
        if source.is_dir() and target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    for file in sorted(p for p in staging.rglob("*") if p.is_file() or p.is_symlink()):
        target = root / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(file, target)
    shutil.rmtree(staging, ignore_errors=True)


class StageStore:
    """Records finished stages in ``<out>/stages/<name>.json`` and says which can be reused.

    A stage is reused when its record (format :data:`RECORD_VERSION`) holds the same input hash and
    every file it lists has the recorded sha256; otherwise it is recomputed, with a message saying
    why when a record was there. ``compute`` writes into a staging folder (``stage_into(folder)``
    redirects the run's writes there); the old record is removed before the files are moved into
    place and the new record is written last, so a run killed at any point leaves either a complete
    stage with its record or no record. Under torchrun every rank takes the same decision (all
    ranks check before any writes), only rank 0 writes the record, and ranks wait for each other
    after each stage.

    Example:
        >>> store = StageStore("report")                                              # doctest: +SKIP
        >>> store.run("baseline", {"model": None}, compute=lambda: (["baseline.csv"], {}), log=print)  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike, force: bool = False, *, write_root: Optional[str | os.PathLike] = None,
                 stage_into: Optional[Callable[[Path], ContextManager[Any]]] = None):
        self.out, self.force = Path(out), force
        self.layout = ReportLayout(self.out)
        self.dir = self.layout.stages
        self.write_root = Path(write_root) if write_root is not None else self.out
        self.stage_into = stage_into

    @staticmethod
    def digest(inputs: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check(self, name: str, inputs: dict[str, Any]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """``(record, None)`` if the stage can be reused, else ``(None, why)`` (``why`` None when there is no record)."""
        path = self.layout.stage_record(name)
        if self.force or not path.is_file():
            return None, None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return None, f"its record is unreadable ({err})"
        if not isinstance(record, dict) or not format_matches("stage_record", record.get("format_version")) or not isinstance(record.get("sha256"), dict):
            return None, f"its record has another format (expected version {RECORD_VERSION})"
        if record.get("hash") != self.digest(inputs):
            return None, None  # other settings: an ordinary re-run, nothing to warn about
        for rel, expected in record["sha256"].items():
            file = self.out / rel
            if not file.is_file():
                return None, f"{rel} is missing"
            if _sha256(file) != expected:
                return None, f"{rel} does not match the sha256 in its record (changed or truncated since)"
        for entry in record.get("files", []):
            if not (self.out / entry).exists():
                return None, f"{entry} is missing"
        return record, None

    def fresh(self, name: str, inputs: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The stage's record if it can be reused, else None."""
        return self.check(name, inputs)[0]

    def run(self, name: str, inputs: dict[str, Any], compute: Callable[[], tuple[list[str], dict]], log: Callable[[str], None]) -> dict[str, Any]:
        """Reuse the stage, or run ``compute() -> (files relative to out, extra record fields)`` and record it."""
        record, why = self.check(name, inputs)
        distributed.barrier()  # every rank has decided before rank 0 can write anything of this stage
        if record is not None:
            log(f"[{name}] reused (computed {record['finished']} in {record['seconds']:.0f} s; {len(record['sha256'])} files verified)")
            return {**record, "cached": True}
        log(f"[{name}] recomputing: {why}" if why else f"[{name}] running")
        start = time.perf_counter()
        write_layout = ReportLayout(self.write_root)
        staging = write_layout.staging(name)
        if staging.exists():
            shutil.rmtree(staging)  # left by a killed run
        staging.mkdir(parents=True)
        with self.stage_into(staging) if self.stage_into is not None else contextlib.nullcontext():
            files, extra = compute()
        release_memory()  # the next stage starts from what is live, not from this stage's high mark
        record_path = write_layout.stage_record(name)
        record_path.unlink(missing_ok=True)  # from here until the new record, the stage counts as not finished
        _move_into_place(staging, self.write_root, list(files))
        record = {"format_version": RECORD_VERSION, "stage": name, "hash": self.digest(inputs), "inputs": inputs, "files": sorted(files),
                  "sha256": file_digests(self.write_root, list(files)),
                  "seconds": round(time.perf_counter() - start, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        if distributed.is_main_process():
            write_json_atomic(record_path, record)
        distributed.barrier()  # the stage's files are complete before any rank reads them
        log(f"[{name}] done in {record['seconds']:.0f} s")
        return {**record, "cached": False}


# ---------------------------------------------------------------------------------------- the lock
class OutLockedError(ConfigError):
    """Another process holds the lock on the output folder (a user error: the CLI exits 2)."""


class OutLock:
    """An exclusive lock on an output folder for the whole run (``<out>/stages/.lock``, ``fcntl.flock``).

    The lock file names the holder (pid, host, command line) so the refusal can say who it is. The
    operating system drops the lock when the holder exits, however it exits (SIGKILL included).

    Example:
        >>> with OutLock("report"):      # doctest: +SKIP
        ...     pass
    """

    def __init__(self, out: str | os.PathLike):
        self.path = ReportLayout(out).lock
        self._file: Any = None

    def __enter__(self) -> "OutLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on Windows: run unlocked
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutLockedError(f"out={str(self.path.parent.parent)!r} is in use by {holder}; wait for it to finish, "
                                 f"or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        command = " ".join(sys.argv)[:200]
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')}: {command})")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.close()  # closing releases the flock
            self._file = None


@contextlib.contextmanager
def maybe_lock(out: Path, enabled: bool) -> Iterator[None]:
    """:class:`OutLock` when ``enabled`` (rank 0), else nothing."""
    if not enabled:
        yield
        return
    with OutLock(out):
        yield
