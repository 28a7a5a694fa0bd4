"""tl_taskmap: map where multi-task learning happens inside a TransformerLens model.

The most used names are importable from the top level::

    from tl_taskmap import load_default_model, default_suite, capture, compare_models, relevance, ablate

Submodules hold the rest: :mod:`tl_taskmap.models` (the adapter), :mod:`tl_taskmap.activations`,
:mod:`tl_taskmap.stats`, :mod:`tl_taskmap.neurons`, :mod:`tl_taskmap.evaluate`, :mod:`tl_taskmap.tasks`.
"""

import warnings as _warnings

with _warnings.catch_warnings():
    # tqdm.auto warns "IProgress not found" in Jupyter without ipywidgets (the `notebook` extra) and falls back to
    # text bars, which render in notebooks too; importing it first here keeps that warning out of users' cells.
    _warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto as _tqdm_auto  # noqa: F401

from tl_taskmap.activations import Activations, capture
from tl_taskmap.embedded import load_default_model, load_model
from tl_taskmap.evaluate import evaluate_suite, evaluate_task
from tl_taskmap.models import ModelAdapter, as_adapter
from tl_taskmap.neurons import NeuronSet, ablate, ablation_matrix, finetune, relevance
from tl_taskmap.stats import LayerStats, compare_models, linear_cka
from tl_taskmap.suite import default_suite
from tl_taskmap.tasks import Example, Task, TaskSuite

__version__ = "0.1.0"

__all__ = [
    "Activations", "Example", "LayerStats", "ModelAdapter", "NeuronSet", "Task", "TaskSuite", "ablate", "ablation_matrix",
    "as_adapter", "capture", "compare_models", "default_suite", "evaluate_suite", "evaluate_task", "finetune",
    "linear_cka", "load_default_model", "load_model", "relevance",
]
