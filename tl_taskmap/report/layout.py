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
#: The layer map's tables (``layers/<name>.csv``) that :func:`~tl_taskmap.report.layer_map.read_layer_map` loads.
LAYER_MAP_TABLES = ("task_vs_null", "pair", "null_pair", "pair_vs_null", "multitask_scores")

PathLike = Union[str, "os.PathLike[str]"]


def _path(value: PathLike) -> Path:
    return Path(value).expanduser()


def _at(*parts: str, doc: str = "") -> property:
    """A property giving ``<root>/<parts...>`` (root: the object's ``folder``, or ``out`` for a ReportLayout)."""
    def get(self: object) -> Path:
        return Path(getattr(self, "folder", None) or getattr(self, "out")).joinpath(*parts)

    return property(get, doc=doc or "/".join(parts))


def _under(kind: type, *parts: str) -> property:
    """A property giving ``kind(<root>/<parts...>)``: a sub-layout."""
    return property(lambda self: kind(_at(*parts).fget(self)), doc=f"{kind.__name__} of {'/'.join(parts)}")


@dataclass(frozen=True)
class _Folder:
    folder: Path


class AblationLayout(_Folder):
    """An ablation matrix's folder: ``matrix.json``, ``cells.csv``, ``delta_table.csv``, ``specificity.csv``.

    Example:
        >>> AblationLayout(Path("r/ablation")).matrix.as_posix()
        'r/ablation/matrix.json'
    """

    matrix = _at("matrix.json")
    cells = _at("cells.csv")
    delta_table = _at("delta_table.csv")
    specificity = _at("specificity.csv")

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file, in :data:`ABLATION_FILES` order."""
        return tuple(self.folder / name for name in ABLATION_FILES)


class LayersLayout(_Folder):
    """The layer-map folder (``layers/``): layer statistics, control records and the layer map's files.

    Example:
        >>> LayersLayout(Path("r/layers")).table("pair").as_posix()
        'r/layers/pair.csv'
    """

    stats = _at("stats", doc=":class:`~tl_taskmap.stats.results.LayerStats` (a folder)")
    stats_csv = _at("layer_stats.csv")
    controls = _at("controls.json", doc="The control models' records")
    null_controls = _at("null_controls.json")
    layer_map = _at("layer_map.json")

    def table(self, name: str) -> Path:
        """A layer-map table, e.g. ``table("task_vs_null")`` → ``layers/task_vs_null.csv``."""
        return self.folder / f"{name}.csv"


class HeadsLayout(_Folder):
    """The attention-head stage's folder (``heads/``).

    Example:
        >>> HeadsLayout(Path("r/heads")).head_set("sentiment").as_posix()
        'r/heads/sets/sentiment.json'
    """

    ablation = _under(AblationLayout, "ablation")

    def relevance(self, task: str) -> Path:
        return self.folder / "relevance" / f"{safe_name(task)}.safetensors"

    def head_set(self, task: str) -> Path:
        return self.folder / "sets" / f"{safe_name(task)}.json"

    def table(self, name: str) -> Path:
        """A table by file name, e.g. ``table("relevance_by_head.csv")``."""
        return self.folder / name


@dataclass(frozen=True)
class ReportLayout:
    """Every path of a task-map output folder ``out`` (nothing is created or read here).

    Example:
        >>> layout = ReportLayout("report")
        >>> layout.html.as_posix(), layout.figure("baseline").as_posix(), layout.rel(layout.control_model("sentiment"))
        ('report/report.html', 'report/figures/baseline.png', 'controls/sentiment')
    """

    out: Path
    # the page and its configuration
    html = _at("report.html")
    config = _at("config.json", doc="The configuration of the run that wrote ``report.html`` (written with it)")
    figures = _at("figures")
    # stage records
    stages = _at("stages")
    current_config = _at("stages", "current_config.json", doc="The configuration of the latest run, finished or not")
    lock = _at("stages", ".lock")
    # results
    baseline = _at("baseline.csv")
    baseline_examples = _at("baseline_examples.json")
    relevance_by_layer = _at("relevance_by_layer.csv")
    neurons = _at("neurons")
    selection = _at("selection", doc="The selection-method comparison's folder")
    layers = _under(LayersLayout, "layers")
    ablation = _under(AblationLayout, "ablation")
    heads = _under(HeadsLayout, "heads")

    def __init__(self, out: PathLike):
        object.__setattr__(self, "out", _path(out))

    def rel(self, path: PathLike) -> str:
        """``path`` relative to ``out``, with forward slashes (how stage records list files)."""
        return Path(path).relative_to(self.out).as_posix()

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"

    def stage_record(self, name: str) -> Path:
        return self.stages / f"{name}.json"

    def staging(self, name: str) -> Path:
        """Where a stage computes before its files are moved into place."""
        return self.stages / ".staging" / name

    def relevance(self, task: str) -> Path:
        return self.out / "relevance" / f"{safe_name(task)}.safetensors"

    def neuron_set(self, task: str) -> Path:
        return self.neurons / f"{safe_name(task)}.json"

    def neuron_table(self, name: str) -> Path:
        """A neuron-stage table by file name: ``jaccard.csv``, ``jaccard_per_layer.csv``, ``overlap_sweep.csv``, ..."""
        return self.neurons / name

    def control_model(self, task: str) -> Path:
        """A saved control model's folder (``controls/<task>``)."""
        return self.out / "controls" / safe_name(task)
