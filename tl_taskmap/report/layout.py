"""Where a task-map run puts each file: one object owns every path of the output folder.

The pipeline writes through a :class:`ReportLayout` of the folder it writes into (the output folder,
or a stage's staging folder), and every reader (the HTML writer, :class:`~tl_taskmap.report.ReportResult`,
the loaders) reads through a :class:`ReportLayout` of the output folder, so a file name is spelled once.

Example:
    >>> from tl_taskmap.report.layout import ReportLayout
    >>> layout = ReportLayout("taskmap-report")
    >>> layout.rel(layout.neuron_set("sentiment"))
    'neurons/sentiment.json'
    >>> layout.rel(layout.ablation.matrix), layout.rel(layout.heads.ablation.specificity)
    ('ablation/matrix.json', 'heads/ablation/specificity.csv')
    >>> layout.rel(layout.layers.stats), layout.rel(layout.stage_record("layers"))
    ('layers/stats', 'stages/layers.json')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from tl_taskmap.file_names import safe_name

__all__ = ["ReportLayout", "AblationLayout", "LayersLayout", "HeadsLayout", "ABLATION_FILES", "LAYER_MAP_TABLES"]

#: The files of an ablation matrix folder (``ablation/`` and ``heads/ablation/``), in the order the stages list them.
ABLATION_FILES = ("matrix.json", "cells.csv", "delta_table.csv", "specificity.csv")
#: The layer map's tables (``layers/<name>.csv``) that :func:`~tl_taskmap.layer_map_stage.read_layer_map` loads.
LAYER_MAP_TABLES = ("task_vs_null", "pair", "null_pair", "pair_vs_null", "multitask_scores")

PathLike = Union[str, "os.PathLike[str]"]


def _path(value: PathLike) -> Path:
    return Path(value).expanduser()


@dataclass(frozen=True)
class AblationLayout:
    """An ablation matrix's folder: ``matrix.json``, ``cells.csv``, ``delta_table.csv``, ``specificity.csv``.

    Example:
        >>> AblationLayout(Path("r/ablation")).matrix.as_posix()
        'r/ablation/matrix.json'
    """

    folder: Path

    @property
    def matrix(self) -> Path:
        return self.folder / "matrix.json"

    @property
    def cells(self) -> Path:
        return self.folder / "cells.csv"

    @property
    def delta_table(self) -> Path:
        return self.folder / "delta_table.csv"

    @property
    def specificity(self) -> Path:
        return self.folder / "specificity.csv"

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file, in :data:`ABLATION_FILES` order."""
        return tuple(self.folder / name for name in ABLATION_FILES)


@dataclass(frozen=True)
class LayersLayout:
    """The layer-map folder (``layers/``): layer statistics, control records and the layer map's files.

    Example:
        >>> LayersLayout(Path("r/layers")).table("pair").as_posix()
        'r/layers/pair.csv'
    """

    folder: Path

    @property
    def stats(self) -> Path:
        """:class:`~tl_taskmap.stats.results.LayerStats` (a folder)."""
        return self.folder / "stats"

    @property
    def stats_csv(self) -> Path:
        return self.folder / "layer_stats.csv"

    @property
    def controls(self) -> Path:
        """The control models' records (``controls.json``)."""
        return self.folder / "controls.json"

    @property
    def null_controls(self) -> Path:
        return self.folder / "null_controls.json"

    @property
    def layer_map(self) -> Path:
        return self.folder / "layer_map.json"

    def table(self, name: str) -> Path:
        """A layer-map table, e.g. ``table("task_vs_null")`` → ``layers/task_vs_null.csv``."""
        return self.folder / f"{name}.csv"


@dataclass(frozen=True)
class HeadsLayout:
    """The attention-head stage's folder (``heads/``).

    Example:
        >>> HeadsLayout(Path("r/heads")).head_set("sentiment").as_posix()
        'r/heads/sets/sentiment.json'
    """

    folder: Path

    def relevance(self, task: str) -> Path:
        return self.folder / "relevance" / f"{safe_name(task)}.safetensors"

    def head_set(self, task: str) -> Path:
        return self.folder / "sets" / f"{safe_name(task)}.json"

    def table(self, name: str) -> Path:
        """A table by file name, e.g. ``table("relevance_by_head.csv")``."""
        return self.folder / name

    @property
    def ablation(self) -> AblationLayout:
        return AblationLayout(self.folder / "ablation")


@dataclass(frozen=True)
class ReportLayout:
    """Every path of a task-map output folder ``out`` (nothing is created or read here).

    Example:
        >>> layout = ReportLayout("report")
        >>> layout.html.as_posix(), layout.figure("baseline").as_posix(), layout.rel(layout.control_model("sentiment"))
        ('report/report.html', 'report/figures/baseline.png', 'controls/sentiment')
    """

    out: Path

    def __init__(self, out: PathLike):
        object.__setattr__(self, "out", _path(out))

    def rel(self, path: PathLike) -> str:
        """``path`` relative to ``out``, with forward slashes (how stage records list files)."""
        return Path(path).relative_to(self.out).as_posix()

    # the page and its configuration
    @property
    def html(self) -> Path:
        return self.out / "report.html"

    @property
    def config(self) -> Path:
        """The configuration of the run that wrote ``report.html`` (``config.json``, written with it)."""
        return self.out / "config.json"

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"

    # stage records
    @property
    def stages(self) -> Path:
        return self.out / "stages"

    def stage_record(self, name: str) -> Path:
        return self.stages / f"{name}.json"

    def staging(self, name: str) -> Path:
        """Where a stage computes before its files are moved into place."""
        return self.stages / ".staging" / name

    @property
    def current_config(self) -> Path:
        """The configuration of the latest run, finished or not."""
        return self.stages / "current_config.json"

    @property
    def lock(self) -> Path:
        return self.stages / ".lock"

    # results
    @property
    def baseline(self) -> Path:
        return self.out / "baseline.csv"

    @property
    def baseline_examples(self) -> Path:
        return self.out / "baseline_examples.json"

    def relevance(self, task: str) -> Path:
        return self.out / "relevance" / f"{safe_name(task)}.safetensors"

    @property
    def relevance_by_layer(self) -> Path:
        return self.out / "relevance_by_layer.csv"

    @property
    def neurons(self) -> Path:
        return self.out / "neurons"

    def neuron_set(self, task: str) -> Path:
        return self.neurons / f"{safe_name(task)}.json"

    def neuron_table(self, name: str) -> Path:
        """A neuron-stage table by file name: ``jaccard.csv``, ``jaccard_per_layer.csv``, ``overlap_sweep.csv``, ..."""
        return self.neurons / name

    @property
    def layers(self) -> LayersLayout:
        return LayersLayout(self.out / "layers")

    def control_model(self, task: str) -> Path:
        """A saved control model's folder (``controls/<task>``)."""
        return self.out / "controls" / safe_name(task)

    @property
    def ablation(self) -> AblationLayout:
        return AblationLayout(self.out / "ablation")

    @property
    def heads(self) -> HeadsLayout:
        return HeadsLayout(self.out / "heads")

    @property
    def selection(self) -> Path:
        """The selection-method comparison's folder."""
        return self.out / "selection"
