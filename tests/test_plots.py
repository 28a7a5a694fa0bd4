import numpy as np
import pytest

from tl_taskmap import plots
from tl_taskmap.stats.runner import compare_activations
from tl_taskmap.stats.sections import LayerSections

N_LAYERS = 4
TASKS = {"t1": "c1", "t2": "c1", "t3": "c2", "t4": "c2"}


@pytest.fixture(scope="module")
def stats():
    """Four tasks in two clusters, three 'models' (sft, base, control), four layers, from random activations."""
    rng = np.random.default_rng(0)
    result = None
    for i, (task, cluster) in enumerate(TASKS.items()):
        control = rng.normal(size=(N_LAYERS, 24, 8)) + i  # task-specific offset
        sft = control @ rng.normal(size=(8, 6)) + rng.normal(size=(N_LAYERS, 24, 6))
        base = rng.normal(size=(N_LAYERS, 24, 6))
        one = compare_activations(sft, base, control, names=("sft", "base", "control"), task=task, cluster=cluster,
                                  embedding_layers=[0, 3])
        result = one if result is None else result.merge(one)
    return result


def is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cka_boxes_across_tasks(stats, tmp_path):
    fig = plots.plot_cka_boxes(stats, ("sft", "control"))
    (ax,) = fig.axes
    assert len(ax.get_xticks()) == N_LAYERS
    assert len(ax.lines) == 7 * N_LAYERS  # box, median, 2 whiskers, 2 caps, fliers per layer
    assert "sft vs control" in ax.get_title() and "4 tasks" in ax.get_title()
    fig.savefig(tmp_path / "boxes.png")
    assert is_png(tmp_path / "boxes.png")


def test_cka_boxes_per_cluster(stats, tmp_path):
    fig = plots.plot_cka_boxes(stats, "base vs control", by="cluster", estimator="debiased")
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * N_LAYERS  # one filled box per cluster and layer
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["c1", "c2"]
    assert ax.get_ylabel() == "CKA (debiased)"
    fig.savefig(tmp_path / "clusters.png")
    assert is_png(tmp_path / "clusters.png")
    with pytest.raises(ValueError, match="by must be"):
        plots.plot_cka_boxes(stats, ("sft", "control"), by="task")


def test_cka_curves_with_section_shading(stats, tmp_path):
    sections = LayerSections(shared=(0, 0), transition=(1, 2), refinement=(3, 3), rule="test")
    fig = plots.plot_cka_curves(stats, [("sft", "control"), ("base", "control")], sections=sections)
    (ax,) = fig.axes
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # mean lines and min-max bands
    assert len(ax.patches) == 3  # three shaded sections
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["sft vs control", "base vs control", "shared", "transition", "refinement"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), stats.cka_curve(("sft", "control")))
    no_transition = LayerSections(shared=(0, 1), transition=None, refinement=(2, 3), rule="test")
    assert len(plots.plot_cka_curves(stats, sections=no_transition).axes[0].patches) == 2
    fig.savefig(tmp_path / "curves.png")
    assert is_png(tmp_path / "curves.png")


def test_dims_for_99_curve(stats, tmp_path):
    fig = plots.plot_dims_for_99(stats)
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    np.testing.assert_allclose(ax.lines[1].get_ydata(), stats.dims_for_99("base"))
    one = plots.plot_dims_for_99(stats, ["sft"], task="t2").axes[0]
    assert len(one.lines) == 1 and len(one.collections) == 0 and "t2" in one.get_title()
    fig.savefig(tmp_path / "dims.png")
    assert is_png(tmp_path / "dims.png")


def test_task_similarity_heat_map(stats, tmp_path):
    fig = plots.plot_task_similarity(stats, layer=2, model="control", centre=True)
    assert len(fig.axes) == 2  # the map and its colour bar
    ax = fig.axes[0]
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == (4, 4)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t1", "t2", "t3", "t4"]
    np.testing.assert_allclose(ax.images[0].get_array(), stats.task_similarity(2, model="control", centre=True).to_numpy())
    fig.savefig(tmp_path / "similarity.png")
    assert is_png(tmp_path / "similarity.png")
    table_fig = plots.plot_task_similarity(stats.task_similarity(0))
    assert table_fig.axes[0].images[0].get_array().shape == (4, 4)
    with pytest.raises(ValueError, match="layer"):
        plots.plot_task_similarity(stats)


def test_task_embedding_panels(stats, tmp_path):
    fig = plots.plot_task_embedding(stats, model="sft", method="pca")  # the stored embedding layers: 0 and 3
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.collections) == 4 and sum(len(c.get_offsets()) for c in ax.collections) == 4 * 24
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == list(TASKS)
    fig.savefig(tmp_path / "embedding.png")
    assert is_png(tmp_path / "embedding.png")
    tsne = plots.plot_task_embedding(stats, 3, model="control", colour_by="cluster", n_iter=250, perplexity=10)
    assert len(tsne.axes) == 1 and len(tsne.axes[0].collections) == 2


def test_given_ax_is_used_and_returned(stats):
    from matplotlib.figure import Figure

    fig = Figure()
    ax_a, ax_b = fig.subplots(1, 2)
    assert plots.plot_cka_curves(stats, ax=ax_a) is fig
    assert plots.plot_task_embedding(stats.embedding(0, method="pca"), ax=ax_b) is fig
    assert len(ax_a.lines) == 3 and len(ax_b.collections) == 4
    with pytest.raises(ValueError, match="2 panels"):
        plots.plot_task_embedding(stats, [0, 3], method="pca", ax=ax_b)


def test_new_figures_use_agg_without_pyplot(stats):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.plot_dims_for_99(stats)
    assert isinstance(fig.canvas, FigureCanvasAgg)
