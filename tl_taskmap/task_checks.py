"""Checks of task data before a run: valid tasks, distinct file names, a leak-free split, a reachable hub.

Called by :func:`tl_taskmap.report.config.load_suite` (and usable by any other task loader) before
any model is loaded; every problem is a :class:`~tl_taskmap.report.config.ConfigError` naming the
task and the fix.

Example:
    >>> from tl_taskmap.task_checks import check_suite, split_suite
    >>> selection, evaluation = split_suite(check_suite(suite), seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

from tl_taskmap.errors import ConfigError

__all__ = ["check_suite", "split_suite", "validate_task_spec_result", "quiet_datasets", "hub_unavailable"]


def check_suite(suite: Any) -> Any:
    """Validate every task (:func:`~tl_taskmap.tasks.validate_task`) and its file name; raise :class:`ConfigError` naming the problem.

    Example:
        >>> check_suite(suite)   # doctest: +SKIP
    """
    from tl_taskmap.file_names import check_file_names
    from tl_taskmap.tasks import validate_task

    try:
        for task in suite:
            validate_task(task)
        check_file_names([t.name for t in suite])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return suite


def split_suite(suite: Any, seed: int) -> tuple[Any, Any]:
    """Each task split in half (seeded), every copy of a repeated prompt in the same half, with a warning naming the count.

    A prompt in both halves would let neurons be chosen on the examples that measure them.

    Example:
        >>> selection, evaluation = split_suite(suite, seed=0)   # doctest: +SKIP
    """
    import warnings

    from tl_taskmap.tasks import TaskSuite, repeated_prompts, split_keeping_prompts_together

    pairs = []
    for task in suite:
        repeats = repeated_prompts(task)
        if repeats:
            warnings.warn(f"task {task.name!r}: {repeats} of {len(task)} examples repeat an earlier prompt; each repeated prompt is "
                          f"kept in one half, so no prompt is in both the selection and the evaluation half", UserWarning, stacklevel=3)
        try:
            pairs.append(split_keeping_prompts_together(task, 0.5, seed=seed))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return TaskSuite([p[0] for p in pairs]), TaskSuite([p[1] for p in pairs])


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Within the block, ``datasets`` prints no progress bars or error logs: a bad file gets one error line, ours."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        yield
        return
    bars, level = datasets.utils.logging.is_progress_bar_enabled(), datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def hub_unavailable(timeout_s: float = 3.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be used now (``HF_HUB_OFFLINE`` set, or no connection within ``timeout_s``), else None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]} is set"
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    outcome: list[Optional[str]] = []

    def probe() -> None:  # in a thread: name resolution ignores socket timeouts
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host} is unreachable ({err.strerror or err})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"{host} did not answer within {timeout_s:.0f} s"


def validate_task_spec_result(task: Any, spec: str) -> Any:
    """A loaded task that passes :func:`tl_taskmap.tasks.validate_task`, or a ConfigError naming ``spec``."""
    from tl_taskmap.tasks import validate_task

    try:
        return validate_task(task)
    except ValueError as err:
        raise ConfigError(f"task {spec!r}: {err}") from None
