"""Jupyter display: every main result object renders a compact HTML table (and a figure where it helps)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests import tiny_models
from tl_taskmap.display import html_table, text_colour
from tl_taskmap.tasks import Task


@pytest.fixture(scope="module")
def results():
    from tl_taskmap.activations import capture
    from tl_taskmap.evaluate import evaluate_task
    from tl_taskmap.neurons.ablation_effects import ablation_matrix
    from tl_taskmap.neurons.attribution import relevance
    from tl_taskmap.stats.runner import compare_models
    from tl_taskmap.tasks import TaskSuite

    model = tiny_models.bridge("llama")
    words = "red blue green cat dog fish one two three sun moon star".split()
    a = Task.from_lists("colours", [f"word {w} is" for w in words], [" yes" if i % 2 else " no" for i in range(12)], options=[" yes", " no"])
    b = Task.from_lists("animals", [f"the {w} was" for w in words], [" big" if i % 3 else " small" for i in range(12)], options=[" big", " small"])
    suite = TaskSuite([a, b])
    rels = {t.name: relevance(model, t) for t in suite}
    sets = {n: r.top(0.2).with_name(n) for n, r in rels.items()}
    return {
        "acts": capture(model, a.prompts, sites=["resid_post", "mlp_post"], reduce="last", progress=False),
        "stats": compare_models({"model": model}, suite, progress=False),
        "rel": rels["colours"], "set": sets["colours"],
        "matrix": ablation_matrix(model, suite, sets, seeds=1, progress=False),
        "score": evaluate_task(model, a),
    }


def cells(html: str) -> list[str]:
    return re.findall(r"<td[^>]*>([^<]*)</td>", html)


def test_every_result_renders_html(results):
    for name, obj in results.items():
        html = obj._repr_html_()
        assert html.startswith("<") and "<table" in html, name
    acts = results["acts"]._repr_html_()
    assert "12 examples" in acts and "mlp_post" in acts and "resid_post" in acts
    assert "<img" in results["stats"]._repr_html_() and "<img" in results["set"]._repr_html_() and "<img" in results["rel"]._repr_html_()
    neurons = results["set"]
    assert str(len(neurons)) in cells(neurons._repr_html_())
    score = results["score"]
    assert f"{score.metric_value:.3f}" in cells(score._repr_html_())


def test_ablation_cells_show_the_delta_table_with_readable_text(results):
    matrix = results["matrix"]
    html = matrix._repr_html_()
    expected = [f"{v:+.3f}" for v in matrix.delta_table().to_numpy(float).ravel() if np.isfinite(v)]
    assert cells(html) == expected or sorted(cells(html)) == sorted(expected)
    for background, colour in re.findall(r"background:#(\w{6});color:(\w+)", html):
        rgb = [int(background[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        assert colour == text_colour(rgb)


def test_text_colour_follows_luminance():
    from matplotlib import colormaps

    rdbu = colormaps["RdBu"]
    assert text_colour(rdbu(0.0)) == "white" and text_colour(rdbu(1.0)) == "white"  # dark red / dark blue ends
    assert text_colour(rdbu(0.5)) == "black"  # the near-white centre
    # contrast ratio of the chosen colour is at least that of the other one (WCAG definition)
    for x in np.linspace(0, 1, 21):
        rgba = rdbu(x)
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
        lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
        white, black = 1.05 / (lum + 0.05), (lum + 0.05) / 0.05
        assert text_colour(rgba) == ("white" if white > black else "black")


def test_html_table_truncates_long_tables():
    import pandas as pd

    html = html_table(pd.DataFrame({"x": range(50)}), max_rows=10)
    assert html.count("<tr") == 11 and "40 more rows" in html


def _luminance(rgba) -> float:
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_report_colour_maps_read_in_greyscale():
    """Sequential maps (Jaccard: magma, similarity: viridis) rise in luminance; the diverging ablation map (RdBu)
    darkens monotonically away from zero on both sides, so |change| reads as darkness and the printed sign gives the side."""
    from matplotlib import colormaps

    for name in ("magma", "viridis"):
        lum = [_luminance(colormaps[name](x)) for x in np.linspace(0, 1, 33)]
        assert all(b > a for a, b in zip(lum, lum[1:])), name
    rdbu = [_luminance(colormaps["RdBu"](x)) for x in np.linspace(0, 1, 33)]
    left, right = rdbu[:17], rdbu[16:]
    assert all(b >= a - 1e-3 for a, b in zip(left, left[1:])) and all(b <= a + 1e-3 for a, b in zip(right, right[1:]))


def test_ablation_figure_text_contrast_and_colour_bar_label_fit(results):
    from tl_taskmap.neurons.ablation_effects import plot_ablation_matrix
    from tl_taskmap.plots import _new_axes

    matrix = results["matrix"]
    table = matrix.delta_table()
    fig, (ax,) = _new_axes(None, (3.0 + 1.1 * table.shape[1], 2.0 + 0.5 * 2))  # the report's size for one task (2 rows)
    plot_ablation_matrix(matrix, ax=ax)
    image = ax.images[0]
    for text in ax.texts:
        cell = image.cmap(image.norm(float(text.get_text())))
        assert text.get_color() == text_colour(cell)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    colour_bar = fig.axes[-1]
    label = colour_bar.yaxis.label.get_window_extent(renderer)
    assert page.x0 <= label.x0 and label.x1 <= page.x1 and page.y0 <= label.y0 and label.y1 <= page.y1
