"""The shared setup of the tutorial notebooks: the embedded model, a few built-in tasks split in half, a run clock.

Every notebook in ``tutorials/`` starts with :func:`setup` and ends with :meth:`TutorialSetup.finish`,
so the setup lives in one place and each notebook prints how long it took on the machine that ran it.

Example:
    >>> from tl_taskmap.tutorial import setup
    >>> tut = setup(["word_sentiment", "unit_identification"], max_examples=16)   # doctest: +SKIP
    >>> model, selection, evaluation = tut.model, tut.selection, tut.evaluation   # doctest: +SKIP
    >>> tut.finish()                                                              # doctest: +SKIP
    this notebook ran in 95 s (2 CPU threads, torch 2.13.0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["TutorialSetup", "setup"]


@dataclass
class TutorialSetup:
    """What a tutorial starts from.

    Attributes:
        model: The embedded SmolLM2-135M-Instruct as a ``TransformerBridge``.
        tasks: The chosen built-in tasks (a :class:`~tl_taskmap.tasks.TaskSuite`, ``max_examples`` each).
        selection, evaluation: Each task split in half (seeded): select / train on one, measure on the other.
        started: ``time.perf_counter()`` when the setup began.
    """

    model: Any
    tasks: Any
    selection: Any
    evaluation: Any
    started: float = field(default_factory=time.perf_counter)

    def finish(self) -> float:
        """Print and return the seconds since :func:`setup` began (the notebook's run time, model loading included)."""
        import torch

        seconds = time.perf_counter() - self.started
        print(f"this notebook ran in {seconds:.0f} s ({torch.get_num_threads()} CPU threads, torch {torch.__version__})")
        return seconds


def _inline_figures() -> None:
    """In a Jupyter kernel, show returned matplotlib figures inline (``%matplotlib inline``) even before pyplot is imported.

    :mod:`tl_taskmap.plots` draws on Agg figures without pyplot; IPython shows a returned ``Figure`` as an image only
    once the inline backend has registered its formatter, which otherwise happens on the first ``import matplotlib.pyplot``.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and "IPKernelApp" in shell.config:
        shell.run_line_magic("matplotlib", "inline")


def setup(names: Sequence[str], *, max_examples: int = 16, seed: int = 0, show: bool = True) -> TutorialSetup:
    """Load the embedded model and the named built-in tasks, split each in half; print what was loaded.

    Needs ``python -m tl_taskmap.setup_assets`` once (model and tasks are then read offline).

    Example:
        >>> tut = setup(["word_sentiment", "movie_recommendation"], max_examples=12)   # doctest: +SKIP
        >>> len(tut.selection[0]), len(tut.evaluation[0])                               # doctest: +SKIP
        (6, 6)
    """
    import torch

    from tl_taskmap.embedded import load_default_model
    from tl_taskmap.suite import default_suite

    _inline_figures()
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = load_default_model()  # SmolLM2-135M-Instruct as a TransformerBridge, offline (converted once, then cached)
    loaded = time.perf_counter() - started
    tasks = default_suite(max_examples=max_examples, names=list(names), seed=seed).select(list(names))
    selection, evaluation = tasks.split(0.5, seed=seed)
    if show:
        cfg = model.cfg
        print(f"{cfg.n_layers} layers, d_model={cfg.d_model}, d_mlp={cfg.d_mlp}; loaded in {loaded:.0f} s")
        for task, sel, ev in zip(tasks, selection, evaluation):
            example = task.examples[0]
            print(f"{task}: {len(sel)} selection + {len(ev)} evaluation examples\n    {example.prompt!r} -> {example.target!r}")
    return TutorialSetup(model, tasks, selection, evaluation, started)
