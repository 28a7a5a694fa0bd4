"""Stage records of a task-map run: which finished stages a re-run can reuse.

Each stage of :func:`tl_taskmap.report.map_model` is recorded in ``<out>/stages/<name>.json`` with a
hash of exactly what it depends on (configuration fields, task contents, upstream stage hashes),
the files it wrote and how long it took.

Example:
    >>> from tl_taskmap.report_stages import StageStore
    >>> StageStore.digest({"k": 0.1}) == StageStore.digest({"k": 0.1})
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tl_taskmap import distributed

__all__ = ["StageStore"]


class StageStore:
    """Records finished stages in ``<out>/stages/<name>.json`` and says which can be reused.

    A stage is reused when its record holds the same input hash and every file it listed exists;
    the record is written last (atomically), so an interrupted stage is never reused. Under torchrun
    every rank takes the same decision (all ranks check before any writes), only rank 0 writes the
    record, and ranks wait for each other after each stage.

    Example:
        >>> store = StageStore("report")                                              # doctest: +SKIP
        >>> store.run("baseline", {"model": None}, compute=lambda: (["baseline.csv"], {}), log=print)  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out, self.dir, self.force = Path(out), Path(out) / "stages", force

    @staticmethod
    def digest(inputs: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def fresh(self, name: str, inputs: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The stage's record if it can be reused, else None."""
        path = self.dir / f"{name}.json"
        if self.force or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if record.get("hash") != self.digest(inputs) or not all((self.out / f).exists() for f in record.get("files", [])):
            return None
        return record

    def run(self, name: str, inputs: dict[str, Any], compute: Callable[[], tuple[list[str], dict]], log: Callable[[str], None]) -> dict[str, Any]:
        """Reuse the stage, or run ``compute() -> (files relative to out, extra record fields)`` and record it."""
        record = self.fresh(name, inputs)
        distributed.barrier()  # every rank has decided before rank 0 can write anything of this stage
        if record is not None:
            log(f"[{name}] reused (computed {record['finished']} in {record['seconds']:.0f} s)")
            return {**record, "cached": True}
        log(f"[{name}] running")
        start = time.perf_counter()
        files, extra = compute()
        record = {"stage": name, "hash": self.digest(inputs), "inputs": inputs, "files": sorted(files),
                  "seconds": round(time.perf_counter() - start, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        if distributed.is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{name}.json.tmp"
            tmp.write_text(json.dumps(record, indent=1, default=str))
            os.replace(tmp, self.dir / f"{name}.json")
        distributed.barrier()  # the stage's files are complete before any rank reads them
        log(f"[{name}] done in {record['seconds']:.0f} s")
        return {**record, "cached": False}
