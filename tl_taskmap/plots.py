"""Figures of layer-by-layer results. Figures only: every number comes from ``LayerStats`` methods.

Each function takes an optional matplotlib ``ax`` and returns the ``Figure``. Without ``ax`` a new
figure is made on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, not pyplot), so
nothing here changes the user's backend or pyplot state; save with ``fig.savefig("x.png")``.
In Jupyter, end a cell with the returned figure to show it.

Example:
    >>> from tl_taskmap import plots
    >>> fig = plots.plot_cka_boxes(stats, ("sft", "control"), by="cluster")   # doctest: +SKIP
    >>> fig.savefig("cka_by_cluster.png")                                     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

__all__ = ["plot_cka_boxes", "plot_cka_curves", "plot_dims_for_99", "plot_task_similarity", "plot_task_embedding",
           "plot_layer_difference", "plot_pair_gain"]

SECTION_COLOURS = {"shared": "#9e9e9e", "transition": "#ff9800", "refinement": "#2196f3"}


def _new_axes(ax: Any, figsize: tuple[float, float], n: int = 1) -> tuple[Any, list]:
    """(figure, axes): the given ``ax`` (n must be 1), or a fresh Agg-backed figure with ``n`` panels."""
    if ax is not None:
        if n != 1:
            raise ValueError(f"this figure needs {n} panels; pass ax=None to get a new figure.")
        return ax.figure, [ax]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(figsize[0] * n, figsize[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def text_colour(rgba: Sequence[float]) -> str:
    """``"black"`` or ``"white"``, whichever reads better on a cell of colour ``rgba`` (relative luminance, WCAG).

    Example:
        >>> text_colour((0.4, 0.0, 0.1, 1.0)), text_colour((1.0, 1.0, 0.9, 1.0))
        ('white', 'black')
    """
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # contrast with white (1.05 / (L + 0.05)) vs with black ((L + 0.05) / 0.05): equal at L ≈ 0.179
    return "white" if luminance < 0.179 else "black"


def _pair_label(pair: Union[tuple[str, str], str]) -> str:
    return pair if isinstance(pair, str) else f"{pair[0]} vs {pair[1]}"


def plot_cka_boxes(stats: Any, pair: Union[tuple[str, str], str], *, estimator: str = "biased",
                   site: Optional[str] = None, by: Optional[str] = None, ax: Any = None) -> Any:
    """Box plot of one pair's CKA per layer across tasks; ``by="cluster"`` draws one box per cluster.

    Example:
        >>> fig = plot_cka_boxes(stats, ("base", "control"), by="cluster")   # doctest: +SKIP
    """
    table = stats.cka_by_task(pair, estimator, site)
    layers = list(table.columns)
    fig, (ax,) = _new_axes(ax, (max(4.0, 0.45 * len(layers) + 2), 3.5))
    if by is None:
        ax.boxplot([table[c].dropna().to_numpy() for c in layers], positions=np.arange(len(layers)), widths=0.6)
    elif by == "cluster":
        clusters = sorted(set(stats.clusters[t] for t in table.index))
        width = 0.8 / len(clusters)
        for i, (cluster, colour) in enumerate(zip(clusters, _colours(len(clusters)))):
            rows = table.loc[[t for t in table.index if stats.clusters[t] == cluster]]
            positions = np.arange(len(layers)) - 0.4 + width * (i + 0.5)
            parts = ax.boxplot([rows[c].dropna().to_numpy() for c in layers], positions=positions, widths=width * 0.9,
                               patch_artist=True, manage_ticks=False)
            for box in parts["boxes"]:
                box.set_facecolor(colour)
            parts["boxes"][0].set_label(cluster)
        ax.legend(title="cluster", fontsize="small")
    else:
        raise ValueError(f"by must be None or 'cluster', got {by!r}.")
    ax.set_xticks(np.arange(len(layers)), [str(x) for x in layers])
    ax.set(xlabel="layer", ylabel=f"CKA ({estimator})", title=f"CKA {_pair_label(pair)} across {len(table)} tasks")
    return fig


def plot_cka_curves(stats: Any, pairs: Optional[Sequence[Union[tuple[str, str], str]]] = None, *,
                    estimator: str = "biased", site: Optional[str] = None, sections: Any = None,
                    ax: Any = None) -> Any:
    """Mean CKA per layer over tasks (band: min–max over tasks) for each pair, with optional section shading.

    ``sections`` is a :class:`~tl_taskmap.stats.sections.LayerSections` (e.g. ``stats.sections()``);
    its shared / transition / refinement spans are shaded.

    Example:
        >>> fig = plot_cka_curves(stats, [("sft", "control"), ("base", "control")], sections=stats.sections())  # doctest: +SKIP
    """
    pairs = list(stats.pairs if pairs is None else pairs)
    fig, (ax,) = _new_axes(ax, (6.0, 3.5))
    for pair, colour in zip(pairs, _colours(len(pairs))):
        table = stats.cka_by_task(pair, estimator, site)
        layers, values = np.asarray(table.columns), table.to_numpy(np.float64)
        ax.plot(layers, values.mean(0), marker="o", color=colour, label=_pair_label(pair))
        if len(table) > 1:
            ax.fill_between(layers, values.min(0), values.max(0), color=colour, alpha=0.15, linewidth=0)
    if sections is not None:
        for name, colour in SECTION_COLOURS.items():
            span = getattr(sections, name)
            if span is not None:
                ax.axvspan(span[0] - 0.5, span[1] + 0.5, color=colour, alpha=0.15, label=name, zorder=0)
    ax.set(xlabel="layer", ylabel=f"CKA ({estimator})", title="CKA per layer (mean over tasks)")
    ax.legend(fontsize="small")
    return fig


def plot_dims_for_99(stats: Any, models: Optional[Sequence[str]] = None, *, task: Optional[str] = None,
                     site: Optional[str] = None, ax: Any = None, cap: Optional[tuple[Any, int]] = None) -> Any:
    """Dimensions explaining 99% of the variance per layer, one line per model (band: min–max over tasks).

    ``cap=(n_examples per task, d)``: counts at ``min(n − 1, d)`` are drawn as crosses and left out of the
    line (a capped count reflects the sample size, not the layer).

    Example:
        >>> fig = plot_dims_for_99(stats, ["sft", "base"])   # doctest: +SKIP
    """
    if cap is not None:
        return _plot_dims_capped(stats, models, task, site, ax, cap)
    models = list(stats.models if models is None else models)
    fig, (ax,) = _new_axes(ax, (6.0, 3.5))
    for model, colour in zip(models, _colours(len(models))):
        table = stats.spectrum_by_task(model, "dims_99", site)
        if task is not None:
            table = table.loc[[task]]
        layers, values = np.asarray(table.columns), table.to_numpy(np.float64)
        ax.plot(layers, values.mean(0), marker="o", color=colour, label=model)
        if len(table) > 1:
            ax.fill_between(layers, values.min(0), values.max(0), color=colour, alpha=0.15, linewidth=0)
    ax.set(xlabel="layer", ylabel="dims for 99% variance",
           title=f"Dimensions for 99% variance ({task or 'mean over tasks'})")
    ax.legend(fontsize="small")
    return fig


def _plot_dims_capped(stats: Any, models: Optional[Sequence[str]], task: Optional[str], site: Optional[str], ax: Any,
                      cap: tuple[Any, int]) -> Any:
    from tl_taskmap.stats.spectral import capped_dims

    models = list(stats.models if models is None else models)
    fig, (ax,) = _new_axes(ax, (6.0, 3.5))
    n_by_task, d = cap
    for model, colour in zip(models, _colours(len(models))):
        table = stats.spectrum_by_task(model, "dims_99", site)
        if task is not None:
            table = table.loc[[task]]
        layers, values = np.asarray(table.columns), table.to_numpy(np.float64)
        n = np.asarray(n_by_task)[: len(table)] if task is None else np.asarray([stats.tasks[task]["n_examples"]])
        capped = capped_dims(values, n[:, None], d)
        shown = np.where(capped, np.nan, values)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(shown, 0)
        ax.plot(layers, mean, marker="o", color=colour, label=f"{model} (uncapped tasks)")
        rows, cols = np.nonzero(capped)
        if rows.size:
            ax.scatter(layers[cols], values[rows, cols], marker="x", color=colour, label=f"{model}: at cap min(n−1, d)")
    ax.set(xlabel="layer", ylabel="dims for 99% variance", title=f"Dimensions for 99% variance ({task or 'mean over tasks'})")
    ax.legend(fontsize="small")
    return fig


def plot_layer_difference(frame: pd.DataFrame, *, ylabel: str = "difference", ax: Any = None) -> Any:
    """A ``LayerDifference`` table (task, layer, diff, low, high, positive): one line per task with its interval band.

    Example:
        >>> fig = plot_layer_difference(task_vs_null(...).frame)   # doctest: +SKIP
    """
    fig, (ax,) = _new_axes(ax, (6.5, 3.6))
    tasks = list(dict.fromkeys(frame["task"]))
    for name, colour in zip(tasks, _colours(len(tasks))):
        rows = frame[frame["task"] == name].sort_values("layer")
        unseen = bool(rows["unseen"].any()) if "unseen" in rows else False
        ax.plot(rows["layer"], rows["diff"], color=colour, linestyle="--" if unseen else "-",
                label=name + (" (unseen)" if unseen else ""))
        ax.fill_between(rows["layer"], rows["low"], rows["high"], color=colour, alpha=0.15, linewidth=0)
        hit = rows[rows["positive"]]
        ax.scatter(hit["layer"], hit["diff"], color=colour, zorder=3, s=18)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="layer", ylabel=ylabel)
    _integer_layers(ax)
    ax.legend(fontsize="small")
    return fig


def plot_pair_gain(frames: dict[str, pd.DataFrame]) -> Any:
    """Gain of the tuned model over the base in CKA with the controls (``pair``) and the null controls (``null_pair``).

    Example:
        >>> fig = plot_pair_gain({"pair": pair_frame, "null_pair": null_frame})   # doctest: +SKIP
    """
    fig, axes = _new_axes(None, (6.0, 3.6), n=len(frames))
    for ax, (name, frame) in zip(axes, frames.items()):
        plot_layer_difference(frame, ylabel="CKA(tuned, C) − CKA(base, C)", ax=ax)
        ax.set_title("task controls" if name == "pair" else "null controls")
    return fig


def plot_task_similarity(stats_or_table: Any, layer: Optional[int] = None, *, model: Optional[str] = None,
                         site: Optional[str] = None, centre: bool = False, ax: Any = None) -> Any:
    """Heat map of task × task similarity (``stats.task_similarity(layer)``, or a given square DataFrame).

    Tasks are ordered by cluster when a ``LayerStats`` is given.

    Example:
        >>> fig = plot_task_similarity(stats, layer=12, centre=True)   # doctest: +SKIP
    """
    if isinstance(stats_or_table, pd.DataFrame):
        table, title = stats_or_table, "task similarity"
    else:
        if layer is None:
            raise ValueError("give the layer whose task similarity to plot.")
        table = stats_or_table.task_similarity(layer, model=model, site=site, centre=centre)
        clusters = stats_or_table.clusters
        order = sorted(table.index, key=lambda t: (clusters[t], list(table.index).index(t)))
        table = table.loc[order, order]
        title = f"cosine of {'centred ' if centre else ''}task means, {model or stats_or_table.models[0]}, layer {layer}"
    n = len(table)
    fig, (ax,) = _new_axes(ax, (max(3.5, 0.4 * n + 2), max(3.0, 0.4 * n + 1.5)))
    image = ax.imshow(table.to_numpy(np.float64), cmap="viridis", vmin=-1 if centre else None, vmax=1)
    ax.set_xticks(np.arange(n), [str(t) for t in table.columns], rotation=90)
    ax.set_yticks(np.arange(n), [str(t) for t in table.index])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_task_embedding(stats_or_frame: Any, layers: Union[int, Sequence[int], None] = None, *,
                        model: Optional[str] = None, site: Optional[str] = None, method: str = "tsne",
                        colour_by: str = "task", seed: int = 0, ax: Any = None, **kwargs: Any) -> Any:
    """Scatter of the 2-D t-SNE (or PCA) embedding of sampled per-example representations, one panel per layer.

    Coordinates come from ``stats.embedding(layer, ...)`` (or pass its DataFrame); points are
    coloured by ``"task"`` or ``"cluster"``.

    Example:
        >>> fig = plot_task_embedding(stats, [0, 15, 29], model="sft", colour_by="cluster")   # doctest: +SKIP
    """
    if isinstance(stats_or_frame, pd.DataFrame):
        frames = {None: stats_or_frame}
    else:
        if layers is None:
            layers = stats_or_frame.meta.get("embedding_layers", [])
        layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
        if not layers:
            raise ValueError("no layers with sampled representations; pass layers= or run with embedding_layers=.")
        frames = {layer: stats_or_frame.embedding(layer, model=model, site=site, method=method, seed=seed, **kwargs)
                  for layer in layers}
    fig, axes = _new_axes(ax, (4.0, 3.6), n=len(frames))
    for panel, (layer, frame) in zip(axes, frames.items()):
        groups = list(dict.fromkeys(frame[colour_by]))
        for group, colour in zip(groups, _colours(len(groups))):
            rows = frame[frame[colour_by] == group]
            panel.scatter(rows["x"], rows["y"], s=10, color=colour, label=str(group), alpha=0.8)
        name = {"tsne": "t-SNE", "pca": "PCA"}.get(method, method) + ("" if model is None else f" of {model}")
        panel.set(title=name + ("" if layer is None else f", layer {layer}"),
                  xticks=[], yticks=[])
    axes[-1].legend(title=colour_by, fontsize="small", markerscale=1.5)
    return fig


# ---------------------------------------------------------------------------------------- tasks and neurons
# Figures of the task-neuron and ablation results (the report's), from the tables those stages save.

__all__ += ["random_jaccard", "plot_baseline", "plot_relevance_by_layer", "plot_jaccard_matrix", "plot_overlap_sweep",
            "plot_overlap_by_layer", "plot_parameter_similarity", "plot_specificity"]


def _integer_layers(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def random_jaccard(fraction: float) -> float:
    """Expected Jaccard overlap of two independent random sets, each a ``fraction`` of the neurons: k / (2 − k).

    Example:
        >>> round(random_jaccard(0.1), 4)
        0.0526
    """
    return fraction / (2 - fraction)


def plot_baseline(frame: pd.DataFrame, *, ax: Any = None) -> Any:
    """Bars of each task's metric (one colour per model), with chance accuracy marked.

    ``frame`` has ``task, metric_value, chance`` and optionally ``model`` (e.g. ``evaluate_suite(...)``).

    Example:
        >>> fig = plot_baseline(evaluate_suite(model, suite))   # doctest: +SKIP
    """
    frame = frame if "model" in frame else frame.assign(model="model")
    tasks, models = list(dict.fromkeys(frame["task"])), list(dict.fromkeys(frame["model"]))
    fig, (ax,) = _new_axes(ax, (max(4.0, 0.7 * len(tasks) + 2), 3.5))
    width = 0.8 / len(models)
    for i, (model, colour) in enumerate(zip(models, _colours(len(models)))):
        rows = frame[frame["model"] == model].set_index("task").reindex(tasks)
        ax.bar(np.arange(len(tasks)) - 0.4 + width * (i + 0.5), rows["metric_value"], width * 0.9, color=colour, label=model)
    chance = frame.drop_duplicates("task").set_index("task").reindex(tasks)["chance"].astype(float)
    label = "chance"
    for x, value in enumerate(chance):
        if np.isfinite(value):
            ax.hlines(value, x - 0.45, x + 0.45, colors="black", linestyles="--", label=label)
            label = None  # one legend entry
    metrics = sorted(set(frame["metric"])) if "metric" in frame else ["metric"]
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=45, ha="right")
    ax.set(ylim=(0, 1.05), ylabel=" / ".join(metrics), title="Baseline score per task (evaluation half)")
    ax.legend(fontsize="small")
    return fig


def plot_relevance_by_layer(frame: pd.DataFrame, *, ax: Any = None) -> Any:
    """Share of each task's total grad × act relevance in each layer (where in depth its neurons matter).

    ``frame`` has ``task, layer, relevance_share`` (the report's ``relevance_by_layer.csv``).

    Example:
        >>> fig = plot_relevance_by_layer(pd.read_csv("report/relevance_by_layer.csv"))   # doctest: +SKIP
    """
    tasks = list(dict.fromkeys(frame["task"]))
    fig, (ax,) = _new_axes(ax, (6.0, 3.5))
    for task, colour in zip(tasks, _colours(len(tasks))):
        rows = frame[frame["task"] == task].sort_values("layer")
        ax.plot(rows["layer"], rows["relevance_share"], marker=".", color=colour, label=task)
    _integer_layers(ax)
    ax.set(xlabel="layer", ylabel="share of relevance", title="Where each task's relevance lies in depth")
    ax.legend(fontsize="small", ncol=2)
    return fig


def plot_jaccard_matrix(table: pd.DataFrame, *, ax: Any = None, title: str = "Jaccard overlap of task neuron sets") -> Any:
    """Annotated heat map of a square task × task overlap table (e.g. ``jaccard_matrix(sets)``).

    Example:
        >>> fig = plot_jaccard_matrix(jaccard_matrix(sets))   # doctest: +SKIP
    """
    n = len(table)
    label_room = 0.07 * max((len(str(t)) for t in table.index), default=0)  # inches for the longest task name
    fig, (ax,) = _new_axes(ax, (max(4.5, 0.55 * n + 2 + label_room), max(3.0, 0.55 * n + 1.2 + label_room)))
    values = table.to_numpy(np.float64)
    image = ax.imshow(values, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(np.arange(n), [str(t) for t in table.columns], rotation=45, ha="right")
    ax.set_yticks(np.arange(n), [str(t) for t in table.index])
    if n <= 15:
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=text_colour(image.cmap(image.norm(value))))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_overlap_sweep(frame: pd.DataFrame, *, ax: Any = None) -> Any:
    """Mean Jaccard overlap over task pairs against the top-k fraction (band: min–max), vs random sets.

    ``frame`` is :func:`~tl_taskmap.neurons.overlap.overlap_sweep`'s (``task_a, task_b, fraction, jaccard``);
    the dashed line is the overlap of independent random sets of the same sizes, k / (2 − k).

    Example:
        >>> fig = plot_overlap_sweep(overlap_sweep(scores))   # doctest: +SKIP
    """
    by = frame.groupby("fraction")["jaccard"]
    fractions = np.asarray(sorted(frame["fraction"].unique()), dtype=float)
    fig, (ax,) = _new_axes(ax, (4.8, 3.5))
    ax.plot(fractions * 100, by.mean().reindex(fractions), marker="o", label="task pairs (mean)")
    ax.fill_between(fractions * 100, by.min().reindex(fractions), by.max().reindex(fractions), alpha=0.2, linewidth=0)
    ax.plot(fractions * 100, [random_jaccard(f) for f in fractions], "k--", label="random sets")
    ax.set(xlabel="top-k% of neurons per task", ylabel="Jaccard overlap", ylim=(0, 1.02), title="Overlap as k grows")
    ax.legend(fontsize="small")
    return fig


def plot_overlap_by_layer(frame: pd.DataFrame, fraction: Optional[float] = None, *, ax: Any = None) -> Any:
    """Per-layer Jaccard overlap averaged over task pairs (band: min–max), vs random sets of fraction k.

    ``frame`` is ``jaccard_matrix(sets, per_layer=True)`` (``task_a, task_b, layer, jaccard``).

    Example:
        >>> fig = plot_overlap_by_layer(jaccard_matrix(sets, per_layer=True), fraction=0.1)   # doctest: +SKIP
    """
    pairs = frame[frame["task_a"] < frame["task_b"]].groupby("layer")["jaccard"]
    fig, (ax,) = _new_axes(ax, (6.0, 3.5))
    layers = np.asarray(sorted(frame["layer"].unique()))
    ax.plot(layers, pairs.mean().reindex(layers), marker="o", label="task pairs (mean)")
    ax.fill_between(layers, pairs.min().reindex(layers), pairs.max().reindex(layers), alpha=0.2, linewidth=0)
    if fraction is not None:
        ax.axhline(random_jaccard(fraction), color="black", linestyle="--", label=f"random sets, k={fraction:g}")
    _integer_layers(ax)
    ax.set(xlabel="layer", ylabel="Jaccard overlap", title="Overlap of task neuron sets per layer")
    ax.legend(fontsize="small")
    return fig


def plot_parameter_similarity(frame: pd.DataFrame, *, ax: Any = None) -> Any:
    """Per-layer cosine of task neuron parameters, mean over task pairs (band: min–max).

    ``frame`` is :func:`~tl_taskmap.neurons.similarity.parameter_similarity_matrix`'s (``task_a, task_b, layer, cosine``).

    Example:
        >>> fig = plot_parameter_similarity(parameter_similarity_matrix(model, sets))   # doctest: +SKIP
    """
    pairs = frame[frame["task_a"] < frame["task_b"]].groupby("layer")["cosine"]
    layers = np.asarray(sorted(frame["layer"].unique()))
    fig, (ax,) = _new_axes(ax, (6.0, 3.5))
    ax.plot(layers, pairs.mean().reindex(layers), marker="o", label="task pairs (mean)")
    ax.fill_between(layers, pairs.min().reindex(layers), pairs.max().reindex(layers), alpha=0.2, linewidth=0)
    _integer_layers(ax)
    ax.set(xlabel="layer", ylabel="cosine", title="Parameter similarity of task neurons per layer")
    ax.legend(fontsize="small")
    return fig


def plot_specificity(frame: pd.DataFrame, *, ax: Any = None) -> Any:
    """Per task: extra metric drop from ablating its own neurons vs random and vs other tasks' neurons, with 95% intervals.

    ``frame`` is :func:`~tl_taskmap.neurons.ablation_effects.specificity`'s. Positive: the task's own
    neurons matter more for it than the comparison neurons.

    Example:
        >>> fig = plot_specificity(specificity(matrix))   # doctest: +SKIP
    """
    tasks = list(frame["task"])
    fig, (ax,) = _new_axes(ax, (6.0, max(2.5, 0.45 * len(tasks) + 1.2)))
    y = np.arange(len(tasks))
    for offset, (label, colour) in zip((-0.18, 0.18), (("random", "#d62728"), ("other", "#1f77b4"))):
        value = frame[f"vs_{label}"].to_numpy(float)
        low, high = frame[f"vs_{label}_low"].to_numpy(float), frame[f"vs_{label}_high"].to_numpy(float)
        err = np.vstack([value - low, high - value])
        ax.barh(y + offset, value, 0.34, xerr=np.where(np.isfinite(err), err, 0), color=colour, alpha=0.8, capsize=3,
                label=f"own − {label} neurons")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, tasks)
    ax.invert_yaxis()
    ax.set(xlabel="extra drop of the task's metric", title="Specificity of task neurons (95% intervals)")
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------- attention heads
__all__ += ["plot_head_relevance", "plot_relevance_neurons_vs_heads", "plot_head_overlap"]


def plot_head_relevance(frame: pd.DataFrame, *, ax: Any = None, title: str = "Head relevance (mean share over tasks)") -> Any:
    """Heat map of head relevance by layer (rows) and head (columns).

    ``frame`` is long, ``task, layer, head, share`` (the report's ``heads/relevance_by_head.csv``: each
    task's head scores divided by their total); the map shows the mean share over tasks.

    Example:
        >>> fig = plot_head_relevance(pd.read_csv("report/heads/relevance_by_head.csv"))   # doctest: +SKIP
    """
    table = frame.pivot_table(index="layer", columns="head", values="share", aggfunc="mean").sort_index().sort_index(axis=1)
    n_layers, n_heads = table.shape
    fig, (ax,) = _new_axes(ax, (max(4.6, 0.4 * n_heads + 2.4), max(3.0, 0.16 * n_layers + 1.5)))
    image = ax.imshow(table.to_numpy(np.float64), cmap="viridis", aspect="auto", vmin=0, interpolation="nearest")
    ax.set_xticks(np.arange(n_heads), [str(h) for h in table.columns])
    step = max(1, n_layers // 15)
    ax.set_yticks(np.arange(0, n_layers, step), [str(l) for l in table.index[::step]])
    ax.set(xlabel="head", ylabel="layer", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of relevance")
    return fig


def plot_relevance_neurons_vs_heads(neurons: pd.DataFrame, heads: pd.DataFrame) -> Any:
    """Two panels side by side: share of each task's neuron relevance and head relevance per layer.

    Both frames have ``task, layer, relevance_share`` (``relevance_by_layer.csv`` and
    ``heads/relevance_by_layer.csv``); the y axes are shared so the depth profiles compare directly.

    Example:
        >>> fig = plot_relevance_neurons_vs_heads(pd.read_csv("r/relevance_by_layer.csv"), pd.read_csv("r/heads/relevance_by_layer.csv"))   # doctest: +SKIP
    """
    fig, axes = _new_axes(None, (5.0, 3.5), 2)
    for ax, frame, unit in zip(axes, (neurons, heads), ("MLP neurons", "attention heads")):
        plot_relevance_by_layer(frame, ax=ax)
        ax.set_title(f"{unit}: share of relevance per layer")
    top = max(float(neurons["relevance_share"].max()), float(heads["relevance_share"].max())) * 1.05
    for ax in axes:
        ax.set_ylim(0, top)
    return fig


def plot_head_overlap(frame: pd.DataFrame, *, ax: Any = None) -> Any:
    """Jaccard overlap of each task pair's head sets against matched random sets (dot and 95% range).

    ``frame`` has ``task_a, task_b, jaccard, random_mean, random_low, random_high`` (the report's
    ``heads/overlap_vs_random.csv``).

    Example:
        >>> fig = plot_head_overlap(pd.read_csv("report/heads/overlap_vs_random.csv"))   # doctest: +SKIP
    """
    labels = [f"{a} / {b}" for a, b in zip(frame["task_a"], frame["task_b"])]
    fig, (ax,) = _new_axes(ax, (6.0, max(2.2, 0.4 * len(labels) + 1.2)))
    y = np.arange(len(labels))
    mean = frame["random_mean"].to_numpy(float)
    err = np.vstack([mean - frame["random_low"].to_numpy(float), frame["random_high"].to_numpy(float) - mean])
    ax.errorbar(mean, y, xerr=err, fmt="o", color="grey", capsize=3, label="random sets (mean, 95% range)")
    ax.scatter(frame["jaccard"], y, color="#d62728", zorder=3, label="task head sets")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set(xlabel="Jaccard overlap", xlim=(0, 1.02), title="Overlap of task head sets vs random")
    ax.legend(fontsize="small")
    return fig
