import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_taskmap.stats import (
    StreamingCovariance,
    StreamingLinearCKA,
    center_gram,
    cka_from_grams,
    feature_space_linear_cka,
    gram_linear,
    gram_rbf,
    linear_cka,
)

REL = 1e-8


def related_pair(n=120, d_x=12, d_y=7, offset=5.0, seed=0):
    """x and a noisy linear image y of it, both with a nonzero mean offset."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_x)) * rng.uniform(0.2, 3.0, size=d_x) + offset
    y = x @ rng.normal(size=(d_x, d_y)) + 0.5 * rng.normal(size=(n, d_y)) - offset
    return x, y


def streamed(x, y, cuts, **kw):
    acc = StreamingLinearCKA(x.shape[1], y.shape[1], **kw)
    bounds = [0, *sorted(cuts), len(x)]
    for lo, hi in zip(bounds, bounds[1:]):
        acc.add(torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]))
    return acc


def assert_rel(actual, expected, rel=REL):
    assert actual == pytest.approx(expected, rel=rel, abs=0), (actual, expected)


# ------------------------------------------------------------------ dense references agree


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_space_equals_gram_form(debiased):
    x, y = related_pair(n=40)
    expected = cka_from_grams(gram_linear(x), gram_linear(y), debiased=debiased)
    assert_rel(feature_space_linear_cka(x, y, debiased=debiased), expected, rel=1e-10)


def test_gram_rbf_and_center_gram_properties():
    x, _ = related_pair(n=30)
    g = gram_rbf(x, threshold=0.5)
    assert np.allclose(np.diag(g), 1.0) and np.allclose(g, g.T) and np.all(g > 0) and np.all(g <= 1)
    gl = gram_linear(x)
    centred = center_gram(gl)
    assert np.allclose(centred.sum(0), 0, atol=1e-8)
    assert np.array_equal(gl, gram_linear(x)), "center_gram must not modify its input"
    u = center_gram(gl, unbiased=True)
    assert np.all(np.diag(u) == 0)
    with pytest.raises(ValueError, match="symmetric"):
        center_gram(np.arange(4.0).reshape(2, 2))


# ------------------------------------------------------------------ streaming == dense


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("cuts", [[], [1], [60], [3, 4, 5, 100], list(range(10, 120, 10))])
def test_streaming_matches_dense(cuts, debiased):
    x, y = related_pair()
    acc = streamed(x, y, cuts)
    assert acc.n == len(x)
    assert_rel(acc.cka(debiased=debiased), feature_space_linear_cka(x, y, debiased=debiased))


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 50), max_size=6),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, 5.0, -40.0]),
    d_x=st.integers(1, 9),
    d_y=st.integers(1, 9),
)
def test_streaming_matches_dense_any_split(cuts, seed, offset, d_x, d_y):
    x, y = related_pair(n=50, d_x=d_x, d_y=d_y, offset=offset, seed=seed)
    acc = streamed(x, y, cuts)
    for debiased in (False, True):
        assert_rel(acc.cka(debiased=debiased), feature_space_linear_cka(x, y, debiased=debiased))


def test_large_offset_keeps_precision():
    # The first-batch shift keeps the algebraic centring exact-ish even with a huge common offset.
    x, y = related_pair(n=200, offset=1e4)
    acc = streamed(x, y, [50, 120])
    for debiased in (False, True):
        assert_rel(acc.cka(debiased=debiased), feature_space_linear_cka(x, y, debiased=debiased), rel=1e-7)


@pytest.mark.parametrize("debiased", [False, True])
def test_merge_equals_single_accumulator(debiased):
    x, y = related_pair(n=150)
    whole = streamed(x, y, [40, 90])
    # Shards have different first-batch means, hence different internal shifts.
    left, right = streamed(x[:70], y[:70], [30]), streamed(x[70:], y[70:], [5])
    right_before = right.state_dict()
    merged = StreamingLinearCKA(12, 7).merge(left).merge(right)
    assert merged.n == whole.n == 150
    assert_rel(merged.cka(debiased=debiased), whole.cka(debiased=debiased), rel=1e-10)
    assert merged.merge(StreamingLinearCKA(12, 7)).n == 150  # merging an empty one is a no-op
    # Merging copies: later adds to the merged accumulator leave the shards untouched.
    merged.add(torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64))
    assert left.n == 70 and all(torch.equal(v, right.state_dict()[k]) for k, v in right_before.items())
    solo = StreamingLinearCKA(12, 7).merge(left)
    solo.add(torch.randn(3, 12), torch.randn(3, 7))
    assert left.n == 70 and left.cka() == streamed(x[:70], y[:70], [30]).cka()
    with pytest.raises(ValueError, match="d_x=12, d_y=7"):
        merged.merge(StreamingLinearCKA(12, 8))


def test_save_load_round_trip(tmp_path):
    x, y = related_pair(n=80)
    x[5, 0] = np.nan
    with pytest.warns(UserWarning, match="dropped 1"):
        acc = streamed(x, y, [33])
    path = tmp_path / "acc.safetensors"
    acc.save(path)
    loaded = StreamingLinearCKA.load(path)
    assert (loaded.n, loaded.n_dropped, loaded.d_x, loaded.d_y) == (79, 1, 12, 7)
    for debiased in (False, True):
        assert loaded.cka(debiased=debiased) == acc.cka(debiased=debiased)
    rebuilt = StreamingLinearCKA.from_state_dict(acc.state_dict())
    assert rebuilt.cka() == acc.cka()
    assert int(acc.state_dict()["format_version"]) == 1
    assert b"pickle" not in path.read_bytes()[:64]
    bad = acc.state_dict()
    bad["format_version"] = torch.tensor(99)
    with pytest.raises(ValueError, match="format_version 99"):
        StreamingLinearCKA.from_state_dict(bad)
    StreamingCovariance(3).add(torch.randn(5, 3)).save(tmp_path / "cov.safetensors")
    with pytest.raises(ValueError, match="StreamingCovariance"):
        StreamingLinearCKA.load(tmp_path / "cov.safetensors")


def test_repr_names_n_and_dims():
    acc = StreamingLinearCKA(4, 6, device="cpu")
    acc.add(torch.randn(10, 4), torch.randn(10, 6))
    assert repr(acc) == "StreamingLinearCKA(d_x=4, d_y=6, n=10, n_dropped=0, device=cpu)"


# ------------------------------------------------------------------ invariances and estimator behaviour


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_scale_and_shift(debiased):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 16)) + 5
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    y = 3.7 * x @ q + rng.normal(size=16) * 10
    acc = streamed(x, y, [20, 50])
    assert abs(acc.cka(debiased=debiased) - 1.0) < 1e-10
    assert abs(linear_cka(torch.from_numpy(x), torch.from_numpy(y), debiased=debiased) - 1.0) < 1e-10


def test_debiased_near_zero_on_independent_data_biased_is_not():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g)
    with pytest.warns(UserWarning, match="inflated"):
        biased = linear_cka(x, y)
    debiased = linear_cka(x, y, debiased=True)
    assert biased > 0.3
    assert abs(debiased) < 0.05
    assert_rel(debiased, feature_space_linear_cka(x.numpy(), y.numpy(), debiased=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_computed_in_float64(dtype):
    x, y = related_pair(n=100, offset=5.0)
    x_lo, y_lo = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    acc = StreamingLinearCKA(12, 7)
    for xb, yb in zip(x_lo.split(17), y_lo.split(17)):
        acc.add(xb, yb)
    x64, y64 = x_lo.double().numpy(), y_lo.double().numpy()
    for debiased in (False, True):
        reference = feature_space_linear_cka(x64, y64, debiased=debiased)
        assert_rel(acc.cka(debiased=debiased), reference)
        assert linear_cka(x_lo, y_lo, debiased=debiased) == linear_cka(x_lo.double(), y_lo.double(), debiased=debiased)


def test_numpy_inputs_accepted():
    x, y = related_pair(n=30)
    assert_rel(linear_cka(x, y), feature_space_linear_cka(x, y))


# ------------------------------------------------------------------ non-finite rows and errors


def test_nonfinite_row_dropped_from_both_models():
    x, y = related_pair(n=60)
    x[3, 2] = np.nan
    y[7, 0] = np.inf
    y[40, 1] = -np.inf
    keep = np.ones(60, bool)
    keep[[3, 7, 40]] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = streamed(x, y, [20])  # two batches with bad rows, one warning
    assert len([w for w in caught if "NaN/inf" in str(w.message)]) == 1
    assert (acc.n, acc.n_dropped) == (57, 3)
    for debiased in (False, True):
        assert_rel(acc.cka(debiased=debiased), feature_space_linear_cka(x[keep], y[keep], debiased=debiased))


def test_shape_errors():
    acc = StreamingLinearCKA(4, 5)
    with pytest.raises(ValueError, match="x has 3 rows but y has 2"):
        acc.add(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="y has feature width 6 but this accumulator was built for 5"):
        acc.add(torch.randn(3, 4), torch.randn(3, 6))
    with pytest.raises(ValueError, match="must be 2-D"):
        acc.add(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="positive feature widths"):
        StreamingLinearCKA(0, 3)
    assert acc.n == 0


def test_too_few_examples():
    acc = StreamingLinearCKA(3, 3)
    with pytest.raises(ValueError, match="at least 2 examples, got n=0"):
        acc.cka()
    acc.add(torch.randn(3, 3), torch.randn(3, 3))
    assert np.isfinite(acc.cka())
    with pytest.raises(ValueError, match=r"at least 4 examples, got n=3.*degenerate"):
        acc.cka(debiased=True)


def test_constant_representation_is_an_error_not_nan():
    acc = StreamingLinearCKA(3, 2)
    acc.add(torch.full((10, 3), 5.3), torch.randn(10, 2))
    for debiased in (False, True):
        with pytest.raises(ValueError, match="x is constant.*CKA is undefined"):
            acc.cka(debiased=debiased)
    acc = StreamingLinearCKA(3, 2).add(torch.randn(10, 3), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="y is constant"):
        acc.cka()


def test_debiased_nonpositive_self_similarity_raises():
    # One outlier among identical rows: the unbiased self-HSIC is exactly 0.
    x = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    acc = StreamingLinearCKA(1, 1).add(x, torch.randn(4, 1))
    assert np.isfinite(acc.cka())
    with pytest.raises(ValueError, match="not positive"):
        acc.cka(debiased=True)


def test_state_dict_is_json_free_tensors_only():
    acc = StreamingLinearCKA(2, 2).add(torch.randn(5, 2), torch.randn(5, 2))
    state = acc.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    json.dumps({k: list(v.shape) for k, v in state.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_statistics_follow_the_input_device():
    x, y = related_pair(n=64)
    acc = StreamingLinearCKA(12, 7)
    for xb, yb in zip(torch.from_numpy(x).half().cuda().split(20), torch.from_numpy(y).half().cuda().split(20)):
        acc.add(xb, yb)
    assert acc.device.type == "cuda"
    x16, y16 = torch.from_numpy(x).half().double().numpy(), torch.from_numpy(y).half().double().numpy()
    for debiased in (False, True):
        assert_rel(acc.cka(debiased=debiased), feature_space_linear_cka(x16, y16, debiased=debiased))
    assert StreamingLinearCKA.from_state_dict(acc.state_dict(), device="cpu").cka() == pytest.approx(acc.cka())


# ---------------------------------------------------------------------------- deferred statistics
class _EagerCKA(StreamingLinearCKA):
    _defer_rows = 0  # build the d×d statistics from the first batch on (the behaviour before deferral)


def _batches(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 5
    return list(x.split(7)), list((x @ torch.randn(d, d, generator=g) + torch.randn(n, d, generator=g)).split(7))


@pytest.mark.parametrize("n", [20, 40, 90])  # all deferred; crossing the threshold (d_x + d_y = 32) mid-way; mostly streamed
def test_deferred_cka_is_bit_identical_to_eager_and_holds_no_matrices_while_deferred(n):
    xs, ys = _batches(n, 16, n)
    lazy, eager = StreamingLinearCKA(16, 16), _EagerCKA(16, 16)
    for x, y in zip(xs, ys):
        lazy.add(x, y)
        eager.add(x, y)
    assert lazy.n == eager.n == n
    assert (lazy._stats_ is None) == (n <= 32)  # no d×d matrix exists while the rows are the smaller state
    for debiased in (False, True):
        assert lazy.cka(debiased=debiased) == eager.cka(debiased=debiased)
    for key, value in eager.state_dict().items():
        assert torch.equal(lazy.state_dict()[key], value), key
    other_lazy, other_eager = StreamingLinearCKA(16, 16), _EagerCKA(16, 16)
    other_lazy.add(xs[0] * 2, ys[0])
    other_eager.add(xs[0] * 2, ys[0])
    assert lazy.merge(other_lazy).cka() == eager.merge(other_eager).cka()


def test_deferred_covariance_is_bit_identical_to_eager():
    from tl_taskmap.stats.spectral import StreamingCovariance

    class Eager(StreamingCovariance):
        _defer_rows = 0

    xs, _ = _batches(14, 16, 3)  # 14 rows of width 16: the rows are the smaller state
    lazy, eager = StreamingCovariance(16), Eager(16)
    for x in xs:
        lazy.add(x)
        eager.add(x)
    assert lazy._stats_ is None and lazy.n == 14
    # While the rows are kept, the spectrum comes from their 14×14 Gram matrix (same eigenvalues, other rounding),
    # and no d×d matrix is built for it.
    torch.testing.assert_close(lazy.eigenvalues(), eager.eigenvalues(), rtol=0, atol=1e-12 * float(eager.eigenvalues()[0]))
    assert lazy.participation_ratio() == pytest.approx(eager.participation_ratio(), rel=1e-12)
    assert lazy.dims_for_variance(0.99) == eager.dims_for_variance(0.99)
    eigs = lazy.eigenvalues()
    assert lazy._stats_ is None and eigs.shape == (16,) and int((eigs > 1e-9 * eigs[0]).sum()) == 13  # n − 1 after centring
    assert torch.equal(lazy.covariance(), eager.covariance())
    assert torch.equal(lazy.mean, eager.mean)
    assert repr(lazy) == "StreamingCovariance(d=16, n=14, device=cpu)"
