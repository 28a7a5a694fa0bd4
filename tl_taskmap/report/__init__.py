"""The one-command task map and its report, as one subpackage.

:func:`map_model` (:mod:`tl_taskmap.report.pipeline`) runs every stage and writes the report folder.
The parts, one idea each:

* :mod:`~tl_taskmap.report.config` — :class:`MapConfig`, its validation and the task halves;
* :mod:`~tl_taskmap.report.stages` — the stages declared as data and their records (reuse, integrity, the lock);
* :mod:`~tl_taskmap.report.layout` — :class:`~tl_taskmap.report.layout.ReportLayout`, every path of the folder;
* :mod:`~tl_taskmap.report.heads`, :mod:`~tl_taskmap.report.layer_map` — the attention-head and layer-map stages;
* :mod:`~tl_taskmap.report.html` — the HTML writer (results in, ``report.html`` out; never the configuration);
* :mod:`~tl_taskmap.report.notes`, :mod:`~tl_taskmap.report.labels` — what the page leaves out, the models' labels.

The old module paths (``tl_taskmap.report_config``, ``tl_taskmap.report_stages``, ``tl_taskmap.report_html``,
``tl_taskmap.report_heads``, ``tl_taskmap.report_labels``, ...) keep working.

Example:
    >>> from tl_taskmap.report import MapConfig, map_model
    >>> result = map_model(MapConfig(out="taskmap-report"))   # doctest: +SKIP
    >>> result.html                                           # doctest: +SKIP
    PosixPath('taskmap-report/report.html')
"""

from tl_taskmap.report.config import ConfigError, MapConfig
from tl_taskmap.report.labels import CONTROL_LABEL, MODEL_LABEL, SECOND_LABEL
from tl_taskmap.report.pipeline import STAGES, ReportResult, load_neuron_sets, load_relevance, map_model, safe_name
from tl_taskmap.report.stages import StageStore

__all__ = ["MapConfig", "ConfigError", "ReportResult", "StageStore", "map_model", "safe_name", "load_relevance",
           "load_neuron_sets", "STAGES", "MODEL_LABEL", "SECOND_LABEL", "CONTROL_LABEL"]
