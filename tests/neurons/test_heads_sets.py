"""HeadSet: the UnitSet algebra over (layer, head), compared with dense boolean masks; kinds never mix; I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tl_taskmap.neurons.overlap import jaccard_matrix
from tl_taskmap.neurons.sets import HeadSet, NeuronSet, UnitSet


def random_mask(seed, shape=(4, 9), p=0.3):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def test_algebra_matches_dense_masks():
    for seed in range(5):
        ma, mb = random_mask(seed), random_mask(seed + 100)
        a, b = HeadSet.from_mask(ma), HeadSet.from_mask(mb)
        assert torch.equal((a | b).to_mask(), ma | mb) and torch.equal((a & b).to_mask(), ma & mb)
        assert torch.equal((a - b).to_mask(), ma & ~mb) and torch.equal((a ^ b).to_mask(), ma ^ mb)
        union = int((ma | mb).sum())
        assert a.jaccard(b) == (int((ma & mb).sum()) / union if union else 1.0)
        per_layer = [(int((ma[l] & mb[l]).sum()) / int((ma[l] | mb[l]).sum())) if int((ma[l] | mb[l]).sum()) else 1.0 for l in range(4)]
        assert a.jaccard_per_layer(b) == per_layer
        assert isinstance(a | b, HeadSet) and len(a) == int(ma.sum())


def test_top_k_random_like_and_tables():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
    top = HeadSet.top_k(scores, 0.34, name="t")
    assert list(top) == [(0, 1), (1, 0)] and top.meta["k"] == 1 and top.n_heads == 3 and top.units_per_layer == 3
    assert list(top.to_dataframe().columns) == ["layer", "head"]
    assert top.summary_dataframe()["fraction"].tolist() == pytest.approx([1 / 3, 1 / 3])
    task = HeadSet(3, 9, {0: [1, 2], 2: [8]}, name="t")
    draws = [task.random_like(seed) for seed in range(20)]
    assert all(d.counts_per_layer() == [2, 0, 1] and isinstance(d, HeadSet) for d in draws)
    assert task.random_like(3) == task.random_like(3) and len({d for d in draws}) > 1
    assert all(len(task.random_like(s, exclude=task) & task) == 0 for s in range(5))
    assert repr(task).startswith("HeadSet(name='t', n_layers=3, n_heads=9, total=3")
    assert task.unit == "head" and NeuronSet.empty(1, 4).unit == "neuron"


def test_kinds_never_mix():
    heads, neurons = HeadSet(2, 4, {0: [1]}), NeuronSet(2, 4, {0: [1]})
    assert heads != neurons and hash(heads) != hash(neurons) and list(heads) == list(neurons)
    for op in (lambda: heads | neurons, lambda: neurons & heads, lambda: heads.jaccard(neurons), lambda: heads.random_like(0, exclude=neurons)):
        with pytest.raises(TypeError, match="different unit kinds"):
            op()
    assert not isinstance(heads, NeuronSet) and isinstance(heads, UnitSet)
    with pytest.raises(ValueError, match="HeadSet was built for n_heads=4 but the model has n_heads=9"):
        heads.check_compatible(2, 9)
    with pytest.raises(ValueError, match="layer 0: head index 4 is out of range for n_heads=4"):
        HeadSet(2, 4, {0: [4]})
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        HeadSet(2, 0)
    with pytest.raises(AttributeError, match="HeadSet is immutable"):
        heads._name = "x"


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_save_load_round_trip_and_kind_check(tmp_path, suffix):
    s = HeadSet.from_mask(random_mask(1), name="qqp", meta={"k": 0.1})
    path = tmp_path / f"heads{suffix}"
    s.save(path)
    back = HeadSet.load(path)
    assert back == s and back.name == "qqp" and back.meta == s.meta and isinstance(back, HeadSet)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left
    n_path = tmp_path / f"neurons{suffix}"
    NeuronSet.from_mask(random_mask(2)).save(n_path)
    with pytest.raises(ValueError, match="n_heads|HeadSet"):
        HeadSet.load(n_path)
    with pytest.raises(ValueError, match="d_mlp|NeuronSet"):
        NeuronSet.load(path)
    if suffix == ".json":
        payload = json.loads(path.read_text())
        assert payload["n_heads"] == 9 and "d_mlp" not in payload


def test_neuron_set_file_format_unchanged(tmp_path):
    s = NeuronSet(2, 8, {1: [3]}, name="x")
    s.save(tmp_path / "n.json")
    assert set(json.loads((tmp_path / "n.json").read_text())) == {"format_version", "n_layers", "d_mlp", "name", "meta", "indices"}


def test_overlap_tools_take_head_sets():
    sets = {"a": HeadSet(1, 4, {0: [0, 1]}), "b": HeadSet(1, 4, {0: [1, 2]})}
    assert np.allclose(jaccard_matrix(sets).to_numpy(), [[1, 1 / 3], [1 / 3, 1]])
