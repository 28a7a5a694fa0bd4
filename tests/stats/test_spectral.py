import numpy as np
import pytest
import torch

from tl_taskmap.stats import StreamingCovariance, dims_for_variance_from_eigenvalues


def decaying_data(n=300, d=24, offset=5.0, seed=0):
    """Data with a geometrically decaying spectrum and a common offset."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * 0.8 ** np.arange(d)) @ basis.T + offset


def streamed(x, cuts):
    cov = StreamingCovariance(x.shape[1])
    bounds = [0, *cuts, len(x)]
    for lo, hi in zip(bounds, bounds[1:]):
        cov.add(torch.from_numpy(x[lo:hi]))
    return cov


def svd_count(x, fraction):
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    explained = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(explained >= fraction)) + 1


@pytest.mark.parametrize("cuts", [[], [1, 2], [100], [37, 150, 299]])
def test_mean_and_covariance_match_numpy(cuts):
    x = decaying_data()
    cov = streamed(x, cuts)
    assert cov.n == 300
    np.testing.assert_allclose(cov.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.covariance().numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dims_for_variance_equals_svd_count(fraction, seed):
    x = decaying_data(seed=seed)
    cov = streamed(x, [120])
    assert cov.dims_for_variance(fraction) == svd_count(x, fraction)


def test_dims_for_variance_rank_deficient_n_less_than_d():
    x = decaying_data(n=10, d=24)
    cov = streamed(x, [4])
    eigs = cov.eigenvalues()
    assert torch.all(eigs >= 0) and torch.all(eigs[:-1] >= eigs[1:])
    assert cov.dims_for_variance(0.99) == svd_count(x, 0.99)
    assert cov.dims_for_variance(1.0) == 9  # n - 1 nonzero directions after centring


def test_eigenvalues_and_participation_ratio():
    x = decaying_data()
    cov = streamed(x, [50])
    expected = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(cov.eigenvalues().numpy(), expected, rtol=1e-9, atol=1e-12)
    assert cov.participation_ratio() == pytest.approx(expected.sum() ** 2 / (expected**2).sum(), rel=1e-10)
    eye = torch.eye(8, dtype=torch.float64)
    iso = StreamingCovariance(8).add(torch.cat([eye, -eye]))  # covariance ∝ identity
    assert iso.participation_ratio() == pytest.approx(8.0)


def test_pure_function():
    assert dims_for_variance_from_eigenvalues(np.array([5.0, 3.0, 1.5, 0.5]), 0.9) == 3
    assert dims_for_variance_from_eigenvalues([0.5, 1.5, 5.0, 3.0], 0.9) == 3  # order does not matter
    assert dims_for_variance_from_eigenvalues([1.0, 1.0, 0.0, -1e-18], 1.0) == 2
    assert dims_for_variance_from_eigenvalues(torch.tensor([4.0, 1.0]), 0.8) == 1
    with pytest.raises(ValueError, match="fraction"):
        dims_for_variance_from_eigenvalues([1.0], 0.0)
    with pytest.raises(ValueError, match="constant data"):
        dims_for_variance_from_eigenvalues([0.0, 0.0], 0.99)


def test_merge_equals_single_accumulator():
    x = decaying_data()
    whole = streamed(x, [100])
    left, right = streamed(x[:120], [60]), streamed(x[120:], [])
    merged = StreamingCovariance(24).merge(left).merge(right).merge(StreamingCovariance(24))
    assert merged.n == 300
    np.testing.assert_allclose(merged.covariance().numpy(), whole.covariance().numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(merged.mean.numpy(), x.mean(0), rtol=1e-12)
    merged.add(torch.randn(5, 24, dtype=torch.float64))
    assert left.n == 120 and torch.allclose(left.mean, torch.from_numpy(x[:120].mean(0)))
    with pytest.raises(ValueError, match="d=24"):
        merged.merge(StreamingCovariance(3))


def test_save_load_round_trip(tmp_path):
    cov = streamed(decaying_data(), [10])
    cov.save(tmp_path / "cov.safetensors")
    loaded = StreamingCovariance.load(tmp_path / "cov.safetensors")
    assert loaded.n == 300 and repr(loaded) == "StreamingCovariance(d=24, n=300, device=cpu)"
    assert torch.equal(loaded.covariance(), cov.covariance())
    assert loaded.dims_for_variance() == cov.dims_for_variance()


def test_errors():
    cov = StreamingCovariance(4)
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf row"):
        cov.add(x)
    assert cov.n == 0
    with pytest.raises(ValueError, match="feature width 5"):
        cov.add(torch.randn(3, 5))
    cov.add(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 examples"):
        cov.covariance()
    constant = StreamingCovariance(3).add(torch.ones(5, 3))
    with pytest.raises(ValueError, match="constant"):
        constant.participation_ratio()
    with pytest.raises(ValueError, match="constant"):
        constant.dims_for_variance()


def test_half_precision_input_is_upcast():
    x = torch.from_numpy(decaying_data(n=64, d=8)).to(torch.bfloat16)
    cov = StreamingCovariance(8).add(x)
    np.testing.assert_allclose(cov.covariance().numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-13)
