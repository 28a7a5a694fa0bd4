"""Helpers shared by the real-model scripts (``ncft_demo.py``, ``table2_ncft.py``).

Run the scripts as ``python scripts/<name>.py``: Python puts ``scripts/`` on the path, so they import
this module as ``_common``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Optional

from tl_taskmap.tasks import Task


def pick_tasks(suite: Any, names: Optional[str], n: int, *, require_n: bool = False) -> list[Task]:
    """Named tasks, or the first ``n`` multiple-choice, non-control tasks of distinct clusters in suite order.

    With ``require_n``, fewer than ``n`` such tasks is an error (exit with a message naming ``--tasks``).
    """
    if names:
        return [suite[name.strip()] for name in names.split(",")]
    chosen: list[Task] = []
    for task in suite:
        if task.metric == "accuracy" and not task.meta.get("control") and task.cluster not in {t.cluster for t in chosen}:
            chosen.append(task)
        if len(chosen) == n:
            break
    if require_n and len(chosen) < n:
        raise SystemExit(f"the suite has only {len(chosen)} multiple-choice tasks of distinct clusters; pass --tasks")
    return chosen


def json_safe(value: Any) -> Any:
    """NaN -> null (strict JSON), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Optional[str], out: Any) -> None:
    """Write ``out`` as strict JSON (NaN as null) to ``path``; nothing when ``path`` is None."""
    if path:
        with open(path, "w") as handle:
            json.dump(json_safe(out), handle, indent=1)


def finish(out: dict[str, Any], start: float, path: Optional[str]) -> dict[str, Any]:
    """Record and print the run time since ``start`` (``time.perf_counter()``), write ``out`` to ``path``; returns ``out``."""
    out["seconds"] = time.perf_counter() - start
    print(f"\ntotal {out['seconds']:.0f} s")
    write_json(path, out)
    return out
