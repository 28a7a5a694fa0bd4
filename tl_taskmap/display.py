"""Rich display in Jupyter: a compact HTML table and, where it helps, a small inline figure for each result object.

The result classes (:class:`~tl_taskmap.sinks.Activations`, :class:`~tl_taskmap.stats.results.LayerStats`,
:class:`~tl_taskmap.neurons.sets.NeuronSet`, :class:`~tl_taskmap.neurons.attribution.RelevanceScores`,
:class:`~tl_taskmap.neurons.ablation_effects.AblationMatrix`, :class:`~tl_taskmap.report.ReportResult`,
:class:`~tl_taskmap.evaluate.TaskScore`) each have a one-line ``_repr_html_`` calling a function here, so a
notebook cell ending in one of them shows a table instead of a text repr. Everything is self-contained HTML
(figures as base64 PNG); nothing here changes pyplot state.

Example:
    >>> from tl_taskmap.display import html_table
    >>> import pandas as pd
    >>> html_table(pd.DataFrame({"task": ["a"], "score": [0.5]})).startswith("<div")
    True
"""

from __future__ import annotations

import base64
import html as html_lib
import io
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from tl_taskmap.plots import text_colour

__all__ = ["html_table", "figure_html", "text_colour", "activations_html", "layer_stats_html", "neuron_set_html",
           "relevance_html", "ablation_html", "report_result_html", "task_score_html"]

_STYLE = "font-size:0.85em;border-collapse:collapse"


def _esc(text: Any) -> str:
    return html_lib.escape(str(text))


def _title(text: str) -> str:
    return f"<b>{_esc(text)}</b>"


def html_table(frame: pd.DataFrame, *, index: bool = False, digits: int = 3, max_rows: int = 30) -> str:
    """A compact HTML table (at most ``max_rows`` rows, floats to ``digits``).

    Example:
        >>> "<table" in html_table(pd.DataFrame({"x": [1.23456]}))
        True
    """
    shown = frame if len(frame) <= max_rows else frame.head(max_rows)
    table = shown.to_html(index=index, border=0, na_rep="–", float_format=lambda v: f"{v:.{digits}f}", escape=True)
    more = f"<div style='font-size:0.8em;color:#666'>… {len(frame) - max_rows} more rows</div>" if len(frame) > max_rows else ""
    return f"<div style='{_STYLE}'>{table}{more}</div>"


def figure_html(fig: Any, *, dpi: int = 80) -> str:
    """A matplotlib figure as an inline ``<img>`` (base64 PNG); the figure is closed if pyplot manages it.

    Example:
        >>> from tl_taskmap.plots import _new_axes
        >>> fig, (ax,) = _new_axes(None, (2, 1)); _ = ax.plot([0, 1])
        >>> figure_html(fig).startswith("<img")
        True
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # noqa: BLE001 - closing is a courtesy; an Agg figure pyplot never saw needs none
        pass
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='figure' src='data:image/png;base64,{data}'>"


def _layout(*parts: str) -> str:
    return "<div style='display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap'>" + "".join(
        f"<div>{p}</div>" for p in parts if p) + "</div>"


def _small_axes(width: float = 4.0, height: float = 2.2) -> tuple[Any, Any]:
    from tl_taskmap.plots import _new_axes

    fig, (ax,) = _new_axes(None, (width, height))
    return fig, ax


# ---------------------------------------------------------------------------------------- objects
def activations_html(acts: Any) -> str:
    """:class:`~tl_taskmap.sinks.Activations`: one row per site kind (layers, width, examples, memory)."""
    rows: dict[str, dict[str, Any]] = {}
    for site in acts.sites:
        tensor = acts[site]
        row = rows.setdefault(site.kind, {"kind": site.kind, "layers": [], "width": tensor.shape[-1], "n_examples": tensor.shape[0],
                                          "dtype": str(tensor.dtype).replace("torch.", ""), "MB": 0.0})
        row["layers"].append(site.layer)
        row["MB"] += tensor.numel() * tensor.element_size() / 2**20
    for row in rows.values():
        layers = sorted(row["layers"])
        row["layers"] = f"{layers[0]}–{layers[-1]} ({len(layers)})" if len(layers) > 1 else str(layers[0])
    return _title(f"Activations: {acts.n_examples} examples, {len(acts.sites)} sites") + html_table(pd.DataFrame(list(rows.values())), digits=1)


def layer_stats_html(stats: Any) -> str:
    """:class:`~tl_taskmap.stats.results.LayerStats`: tasks × models summary and a small CKA (or dims-for-99%) curve."""
    from tl_taskmap import plots

    summary = pd.DataFrame([{"task": t, "cluster": info.get("cluster"), "n_examples": info.get("n_examples", info.get("n"))}
                            for t, info in stats.tasks.items()])
    head = _title(f"LayerStats: {len(stats.tasks)} tasks, models {stats.models}, pairs "
                  f"{[f'{a} vs {b}' for a, b in stats.pairs]}, sites {stats.sites}")
    try:
        fig, ax = _small_axes()
        if stats.pairs:
            estimator = "debiased" if "debiased" in stats.estimators else stats.estimators[0]
            plots.plot_cka_curves(stats, estimator=estimator, ax=ax)
        else:
            plots.plot_dims_for_99(stats, ax=ax)
        ax.title.set_fontsize(9)
        figure = figure_html(fig)
    except Exception as err:  # noqa: BLE001 - the table still shows when a figure cannot be drawn
        figure = f"<i>no figure: {_esc(err)}</i>"
    return head + _layout(html_table(summary.dropna(axis=1, how="all")), figure)


def neuron_set_html(neurons: Any) -> str:
    """A :class:`~tl_taskmap.neurons.sets.NeuronSet` or ``HeadSet``: size and share, and a bar chart of units per layer."""
    counts = neurons.counts_per_layer()
    total = neurons.n_layers * neurons.units_per_layer
    unit = f"{type(neurons).UNIT}s"
    summary = pd.DataFrame([{"name": neurons.name or "–", unit: len(neurons), "share": f"{100 * len(neurons) / total:.2f}%",
                             "layers": neurons.n_layers, type(neurons).SIZE: neurons.units_per_layer,
                             f"layers with {unit}": sum(c > 0 for c in counts)}])
    fig, ax = _small_axes(4.0, 1.8)
    ax.bar(np.arange(len(counts)), counts, color="#4c72b0")
    ax.set(xlabel="layer", ylabel=unit)
    return _title(type(neurons).__name__) + _layout(html_table(summary), figure_html(fig))


def relevance_html(rel: Any) -> str:
    """:class:`~tl_taskmap.neurons.attribution.RelevanceScores`: provenance and each layer's share of the relevance."""
    totals = rel.scores.sum(1).double()
    share = (totals / totals.sum()).numpy() if float(totals.sum()) > 0 else np.zeros(rel.n_layers)
    summary = pd.DataFrame([{"task": rel.name, "examples": rel.n_examples, "tokens": rel.n_tokens, "aggregate": rel.aggregate,
                             "positions": rel.positions, "peak layer": int(share.argmax()), "peak share": float(share.max())}])
    fig, ax = _small_axes(4.0, 1.8)
    ax.plot(np.arange(len(share)), share, marker=".", color="#4c72b0")
    ax.set(xlabel="layer", ylabel="share of relevance")
    return _title("RelevanceScores") + _layout(html_table(summary), figure_html(fig))


def ablation_html(matrix: Any, *, cmap: str = "RdBu") -> str:
    """:class:`~tl_taskmap.neurons.ablation_effects.AblationMatrix`: the metric-change table, cells coloured (red: hurts)."""
    from matplotlib import colormaps

    table = matrix.delta_table()
    values = table.to_numpy(dtype=float)
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    colours = colormaps[cmap]
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = []
    for name, row in zip(table.index, values):
        cells = []
        for v in row:
            if not np.isfinite(v):
                cells.append("<td>–</td>")
                continue
            rgba = colours(0.5 + 0.5 * v / limit)
            background = "#{:02x}{:02x}{:02x}".format(*(int(255 * c) for c in rgba[:3]))
            cells.append(f"<td style='background:{background};color:{text_colour(rgba)};text-align:right'>{v:+.3f}</td>")
        body.append(f"<tr><th style='text-align:left'>{_esc(name)}</th>{''.join(cells)}</tr>")
    title = _title(f"AblationMatrix: mode {matrix.mode}, {len(matrix.seeds)} random seeds; metric change (ablated − baseline)")
    return (f"{title}<div style='{_STYLE}'><table><tr><th>ablated \\ evaluated</th>{head}</tr>{''.join(body)}</table></div>")


def report_result_html(result: Any) -> str:
    """:class:`~tl_taskmap.report.ReportResult`: where the report is, and each stage's time (reused or computed)."""
    stages = pd.DataFrame([{"stage": n, "reused": bool(r.get("cached")), "seconds (when computed)": r.get("seconds")}
                           for n, r in result.stages.items()])
    link = f"<a href='{_esc(result.html)}'>{_esc(result.html)}</a>"
    left = "".join(f"<li>{_esc(n)}</li>" for n in result.left_out)
    return (_title("ReportResult: ") + f"{link} — {len(result.figures)} figures, {result.seconds:.0f} s"
            + _layout(html_table(stages, digits=1), f"<details><summary>left out ({len(result.left_out)})</summary><ul>{left}</ul></details>"))


def task_score_html(score: Any) -> str:
    """:class:`~tl_taskmap.evaluate.TaskScore`: one row (task, metric, value, chance, loss, n)."""
    row = {"task": score.task, "metric": score.metric, "value": score.metric_value, "chance": score.chance, "loss": score.loss, "n": score.n}
    interval: Optional[Any] = getattr(score, "interval", None)
    if callable(interval):
        try:
            low, high = interval()
            row["95% interval"] = f"[{low:.3f}, {high:.3f}]"
        except Exception:  # noqa: BLE001 - an interval is optional extra detail
            pass
    return html_table(pd.DataFrame([row]))
