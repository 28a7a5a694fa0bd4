"""Overlap analysis: Jaccard matrices and the top-k% sweep (Leng & Xiong 2024, Table 8)."""

import numpy as np
import pytest
import torch

from tl_taskmap.neurons.overlap import jaccard_matrix, overlap_sweep
from tl_taskmap.neurons.sets import NeuronSet


def random_sets(n_sets, n_layers=3, d_mlp=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"task{i}": NeuronSet.from_mask(torch.rand(n_layers, d_mlp, generator=gen) > 0.6) for i in range(n_sets)}


def test_jaccard_matrix_symmetric_unit_diagonal_and_matches_pairs():
    sets = random_sets(4)
    matrix = jaccard_matrix(sets)
    assert list(matrix.index) == list(matrix.columns) == list(sets)
    values = matrix.to_numpy()
    np.testing.assert_allclose(values, values.T)
    np.testing.assert_allclose(np.diag(values), 1.0)
    assert matrix.loc["task0", "task2"] == pytest.approx(sets["task0"].jaccard(sets["task2"]))
    assert (values < 1).sum() == 12  # random sets differ off the diagonal


def test_jaccard_matrix_per_layer_long_format():
    sets = random_sets(3, n_layers=2)
    df = jaccard_matrix(sets, per_layer=True)
    assert list(df.columns) == ["task_a", "task_b", "layer", "jaccard"]
    assert len(df) == 3 * 3 * 2
    assert not df["jaccard"].isna().any()
    row = df[(df.task_a == "task1") & (df.task_b == "task2") & (df.layer == 1)]
    assert row["jaccard"].item() == pytest.approx(sets["task1"].jaccard_per_layer(sets["task2"])[1])
    assert (df[df.task_a == df.task_b]["jaccard"] == 1.0).all()


def test_jaccard_matrix_errors():
    with pytest.raises(ValueError, match="at least one"):
        jaccard_matrix({})
    with pytest.raises(ValueError, match="NeuronSet shapes differ"):
        jaccard_matrix({"a": NeuronSet.empty(2, 4), "b": NeuronSet.empty(2, 5)})


@pytest.mark.parametrize("per_layer", [True, False])
def test_overlap_sweep_long_format_and_full_overlap_at_one(per_layer):
    gen = torch.Generator().manual_seed(1)
    scores = {name: torch.rand(3, 50, generator=gen) for name in ["sst2", "qqp", "mnli"]}
    df = overlap_sweep(scores, per_layer=per_layer)
    assert list(df.columns) == ["task_a", "task_b", "fraction", "jaccard"]
    assert len(df) == 3 * 5
    assert set(zip(df.task_a, df.task_b)) == {("sst2", "qqp"), ("sst2", "mnli"), ("qqp", "mnli")}
    assert (df[df.fraction == 1.0]["jaccard"] == 1.0).all()
    # Independent random scores: overlap grows with k (near k / (2 - k) in expectation).
    mean = df.groupby("fraction")["jaccard"].mean()
    assert mean.is_monotonic_increasing
    assert mean[0.1] < 0.2
    first = df[(df.task_a == "sst2") & (df.task_b == "qqp") & (df.fraction == 0.3)]["jaccard"].item()
    expected = NeuronSet.top_k(scores["sst2"], 0.3, per_layer).jaccard(NeuronSet.top_k(scores["qqp"], 0.3, per_layer))
    assert first == pytest.approx(expected)


def test_overlap_sweep_identical_scores_overlap_fully_and_errors():
    scores = torch.rand(2, 10, generator=torch.Generator().manual_seed(2))
    df = overlap_sweep({"a": scores, "b": scores.clone()}, fractions=(0.1, 0.5))
    assert df["jaccard"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least two tasks"):
        overlap_sweep({"a": scores})
    with pytest.raises(ValueError, match="k is a fraction"):
        overlap_sweep({"a": scores, "b": scores}, fractions=(10,))
