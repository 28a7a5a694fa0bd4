import numpy as np
import pytest

from tl_taskmap.stats.cka import feature_space_linear_cka
from tl_taskmap.stats.similarity import cosine_similarity_matrix, cross_task_linear_cka, embed_2d, pca_2d, tsne_2d


def blobs(k=3, per=25, d=12, spread=6.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, size=(k, d))
    x = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    return x, np.repeat(np.arange(k), per)


def nearest_neighbour_accuracy(y, labels):
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def test_cosine_matrix_matches_numpy_and_centring():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 7)) + 10.0  # a large shared offset, as residual-stream means have
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine_similarity_matrix(v), unit @ unit.T, atol=1e-12)
    raw, centred = cosine_similarity_matrix(v), cosine_similarity_matrix(v, centre=True)
    assert raw.min() > 0.9  # the offset dominates raw cosines
    c = v - v.mean(0)
    cu = c / np.linalg.norm(c, axis=1, keepdims=True)
    np.testing.assert_allclose(centred, cu @ cu.T, atol=1e-12)
    assert np.allclose(np.diag(centred), 1.0) and centred.min() < 0


def test_cosine_zero_row_is_nan_and_shape_error():
    out = cosine_similarity_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]))
    assert out[0, 0] == 1.0 and np.isnan(out[1]).all()
    with pytest.raises(ValueError, match="2-D"):
        cosine_similarity_matrix(np.ones(3))


def test_cross_task_cka_equals_reference_and_nan_for_unshared():
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(size=(40, 6)), rng.normal(size=(40, 4)), rng.normal(size=(30, 6))
    for debiased in (False, True):
        m = cross_task_linear_cka([a, b, c], debiased=debiased)
        assert m[0, 1] == pytest.approx(feature_space_linear_cka(a, b, debiased=debiased), rel=1e-12)
        assert m[0, 1] == m[1, 0] and np.isnan(m[0, 2]) and np.isnan(m[2, 1])
        assert m[0, 0] == pytest.approx(1.0)


def test_pca_matches_svd_up_to_sign():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5)) * [6, 3, 1, 0.5, 0.1] + 4
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    y = pca_2d(x)
    np.testing.assert_allclose(np.abs(y), np.abs(u[:, :2] * s[:2]), atol=1e-10)
    assert pca_2d(x[:, :1]).shape == (60, 2)  # one feature: second coordinate is zero


def test_tsne_separates_blobs_and_is_seeded():
    x, labels = blobs()
    y = tsne_2d(x, perplexity=10, n_iter=300)
    assert y.shape == (75, 2) and np.all(np.isfinite(y))
    assert nearest_neighbour_accuracy(y, labels) == 1.0
    np.testing.assert_array_equal(y, tsne_2d(x, perplexity=10, n_iter=300))
    assert not np.allclose(y, tsne_2d(x, perplexity=10, n_iter=300, seed=1))


def test_tsne_reduces_wide_inputs_and_caps_perplexity():
    x, labels = blobs(k=2, per=6, d=80)
    y = tsne_2d(x, perplexity=30)  # perplexity capped at (n-1)/3
    assert nearest_neighbour_accuracy(y, labels) == 1.0


def test_embed_2d_dispatch_and_errors():
    x, _ = blobs(k=2, per=5)
    assert embed_2d(x, "pca").shape == (10, 2)
    with pytest.raises(ValueError, match="unknown embedding method"):
        embed_2d(x, "umap")
    with pytest.raises(ValueError, match="at least 4 rows"):
        tsne_2d(x[:3])
    with pytest.raises(ValueError, match="NaN"):
        tsne_2d(np.full((5, 2), np.nan))
