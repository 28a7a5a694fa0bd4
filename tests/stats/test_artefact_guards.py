"""Artefact guards: capped dims-for-99% counts, the 2-task centred cosine, and t-SNE with too few points."""

from __future__ import annotations

import numpy as np
import pytest

from tl_taskmap.stats.runner import compare_activations
from tl_taskmap.stats.similarity import centred_cosine_omitted, cosine_similarity_matrix, embedding_omitted
from tl_taskmap.stats.spectral import capped_dims, dims_cap


def svd_count(x, fraction=0.99):
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s), fraction * s.sum()) + 1)


def test_two_task_centred_cosine_is_minus_one_by_construction_so_it_is_left_out():
    rng = np.random.default_rng(0)
    for _ in range(5):  # any two task means: centred they are v and -v
        means = rng.normal(size=(2, 16))
        assert cosine_similarity_matrix(means, centre=True)[0, 1] == pytest.approx(-1.0)
    assert "needs ≥ 3 tasks, this run has 2" in centred_cosine_omitted(2)
    assert centred_cosine_omitted(3) is None
    three = cosine_similarity_matrix(rng.normal(size=(3, 16)), centre=True)
    assert not np.allclose(np.abs(three[np.triu_indices(3, 1)]), 1.0)  # with 3 tasks it carries information


def test_dims_at_the_sample_size_cap_are_flagged():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=(12, 40)), rng.normal(size=(400, 40))
    # An independent SVD count: 12 isotropic points in 40 dims need all n - 1 = 11 directions.
    assert svd_count(small) == dims_cap(12, 40) == 11
    assert capped_dims(np.array([svd_count(small)]), 12, 40).tolist() == [True]
    low_rank = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 40))
    assert capped_dims(np.array([svd_count(low_rank), svd_count(large)]), 400, 40).tolist() == [False, True]
    with pytest.raises(ValueError, match="n_examples"):
        dims_cap(0, 4)


def test_t_sne_needs_enough_points_per_task():
    assert embedding_omitted({"a": 40, "b": 31}) is None
    reason = embedding_omitted({"a": 40, "b": 6})
    assert "b (6)" in reason and "a (40)" not in reason


def test_report_does_not_draw_capped_dims_as_a_trend(tmp_path):
    """All counts capped: no figure, a note saying why; some capped: figure with the capped ones marked."""
    from tl_taskmap.report.html import _dims_html, _Figures
    from tl_taskmap.report.layout import ReportLayout

    rng = np.random.default_rng(2)
    iso = rng.normal(size=(3, 10, 32))  # 10 examples, 32 dims: every layer needs n - 1 = 9 directions
    stats = compare_activations(iso, iso + 0.1 * rng.normal(size=iso.shape), names=("model", "control"), task="t")
    assert stats.dims_for_99("model", task="t").tolist() == [9, 9, 9]
    figures = _Figures(ReportLayout(tmp_path))
    html = _dims_html(figures, stats)
    assert "every task and layer sits at the cap" in html and "dims_99" not in figures.paths
    mixed = np.concatenate([iso[:1], np.repeat(rng.normal(size=(1, 10, 2)) @ rng.normal(size=(2, 32)), 2, 0)])
    stats = compare_activations(mixed, mixed, names=("model", "control"), task="t")
    html = _dims_html(figures, stats)
    assert "dims_99" in figures.paths and "1 of 3 task × layer counts are at the cap" in html
