"""NeuronSet: construction, top-k selection, set algebra and Jaccard vs Python sets, random baselines, I/O."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tl_taskmap.neurons.sets import NeuronSet


def from_pairs(n_layers, d_mlp, pairs, **kwargs):
    by_layer = {}
    for layer, idx in pairs:
        by_layer.setdefault(layer, []).append(idx)
    return NeuronSet(n_layers, d_mlp, by_layer, **kwargs)


@st.composite
def shape_and_pair_sets(draw, n_sets=2):
    n_layers = draw(st.integers(1, 4))
    d_mlp = draw(st.integers(1, 10))
    pair = st.tuples(st.integers(0, n_layers - 1), st.integers(0, d_mlp - 1))
    return n_layers, d_mlp, [draw(st.sets(pair, max_size=n_layers * d_mlp)) for _ in range(n_sets)]


def brute_force_top_k(scores, k_per_layer=None, k_total=None):
    """Reference selection: sort (layer, idx) pairs by (-score, layer, idx)."""
    n_layers, d_mlp = scores.shape
    pairs = [(layer, idx) for layer in range(n_layers) for idx in range(d_mlp)]
    key = lambda p: (-float(scores[p]), p[0], p[1])  # noqa: E731
    if k_total is not None:
        return set(sorted(pairs, key=key)[:k_total])
    chosen = set()
    for layer in range(n_layers):
        chosen |= set(sorted([p for p in pairs if p[0] == layer], key=key)[:k_per_layer])
    return chosen


# ----- construction ------------------------------------------------------------------------


def test_construction_sorts_dedupes_and_accepts_tensor_numpy_list():
    s = NeuronSet(3, 8, {0: [5, 1, 5], 1: torch.tensor([7, 0]), 2: np.array([], dtype=np.int64)})
    assert s.indices(0).tolist() == [1, 5]
    assert s.indices(1).tolist() == [0, 7]
    assert s.indices(0).dtype == torch.int64
    assert s.counts_per_layer() == [2, 2, 0]
    assert s.layers() == [0, 1]
    assert len(s) == 4
    assert list(s) == [(0, 1), (0, 5), (1, 0), (1, 7)]
    assert (1, 7) in s and (2, 0) not in s and (5, 0) not in s


def test_indices_returns_a_copy_and_set_is_immutable():
    s = NeuronSet(1, 4, {0: [1, 2]})
    s.indices(0)[0] = 3
    assert s.indices(0).tolist() == [1, 2]
    with pytest.raises(AttributeError, match="immutable"):
        s.d_mlp = 3
    meta = s.meta
    meta["x"] = 1
    assert s.meta == {}


def test_mask_round_trip_empty_and_full():
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    s = NeuronSet.from_mask(mask)
    assert torch.equal(s.to_mask(), mask)
    assert set(s) == {tuple(p) for p in torch.nonzero(mask).tolist()}
    assert len(NeuronSet.empty(3, 7)) == 0 and NeuronSet.empty(3, 7).layers() == []
    assert len(NeuronSet.full(3, 7)) == 21 and NeuronSet.full(3, 7).counts_per_layer() == [7, 7, 7]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: NeuronSet(2, 8, {1: [3, 8]}), "layer 1: neuron index 8 is out of range for d_mlp=8"),
        (lambda: NeuronSet(2, 8, {0: [-1]}), "layer 0: neuron index -1 is out of range"),
        (lambda: NeuronSet(2, 8, {2: [0]}), "layer 2 is out of range for n_layers=2"),
        (lambda: NeuronSet(2, 8, {0: [0.5]}), "layer 0: neuron indices must be integers"),
        (lambda: NeuronSet(2, 8, {0: torch.tensor([True])}), "from_mask"),
        (lambda: NeuronSet(2, 8, {0: [[1, 2]]}), "must be 1-D"),
        (lambda: NeuronSet(2, 8, {"0": [1]}), "layer keys must be integers"),
        (lambda: NeuronSet(0, 8), "n_layers must be a positive integer"),
        (lambda: NeuronSet(2, 0), "d_mlp must be a positive integer"),
        (lambda: NeuronSet(2, 8, meta={"x": object()}), "meta must be a JSON-able dict"),
        (lambda: NeuronSet(2, 8, name=3), "name must be a string"),
        (lambda: NeuronSet.from_mask(torch.ones(2, 3)), "mask must be a bool tensor"),
        (lambda: NeuronSet.from_mask(torch.ones(3, dtype=torch.bool)), "mask must have shape"),
    ],
)
def test_construction_errors(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_membership_needs_a_pair():
    with pytest.raises(TypeError, match="pair"):
        3 in NeuronSet(1, 4)  # noqa: B015


# ----- top_k -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_layers=st.integers(1, 4),
    d_mlp=st.integers(1, 12),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
    n_levels=st.integers(1, 4),
)
def test_top_k_matches_brute_force_with_ties(n_layers, d_mlp, fraction, seed, n_levels):
    # Few distinct levels force many ties, exercising the (layer, index) tie-break.
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, n_levels, (n_layers, d_mlp), generator=gen).float()
    k_layer = min(d_mlp, max(1, math.floor(fraction * d_mlp + 0.5)))
    per_layer = NeuronSet.top_k(scores, fraction)
    assert set(per_layer) == brute_force_top_k(scores, k_per_layer=k_layer)
    assert per_layer.counts_per_layer() == [k_layer] * n_layers
    k_total = min(n_layers * d_mlp, max(1, math.floor(fraction * n_layers * d_mlp + 0.5)))
    global_set = NeuronSet.top_k(scores, fraction, per_layer=False)
    assert set(global_set) == brute_force_top_k(scores, k_total=k_total)
    assert len(global_set) == k_total


def test_top_k_counts_meta_and_rounding():
    scores = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    s = NeuronSet.top_k(scores, 0.1, name="sst2")
    assert s.counts_per_layer() == [1, 1, 1, 1]
    assert [s.indices(layer).tolist() for layer in range(4)] == [[9]] * 4
    assert s.name == "sst2"
    assert s.meta == {"selection": "top_k", "fraction": 0.1, "per_layer": True, "k": 1}
    g = NeuronSet.top_k(scores, 0.1, per_layer=False)
    assert set(g) == {(3, 6), (3, 7), (3, 8), (3, 9)}
    assert NeuronSet.top_k(scores, 0.01).counts_per_layer() == [1, 1, 1, 1]  # at least one
    assert NeuronSet.top_k(scores, 0.25).counts_per_layer() == [3] * 4  # 2.5 rounds half up
    assert NeuronSet.top_k(scores, 1.0) == NeuronSet.full(4, 10)
    assert NeuronSet.top_k(scores, 0.5, meta={"task": "qqp"}).meta["task"] == "qqp"


def test_top_k_handles_infinite_scores_and_bfloat16():
    scores = torch.tensor([[0.0, float("inf"), -float("inf"), 1.0]])
    assert NeuronSet.top_k(scores, 0.5).indices(0).tolist() == [1, 3]
    assert NeuronSet.top_k(scores.to(torch.bfloat16), 0.25).indices(0).tolist() == [1]


@pytest.mark.parametrize("fraction", [0, -0.1, 10, 1.5, float("nan"), True, "0.1"])
def test_top_k_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="k is a fraction: 0.1 means top 10%"):
        NeuronSet.top_k(torch.zeros(2, 4), fraction)


def test_top_k_rejects_nan_and_bad_shape():
    scores = torch.zeros(3, 4)
    scores[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN in layer 2"):
        NeuronSet.top_k(scores, 0.5)
    with pytest.raises(ValueError, match=r"shape \(n_layers, d_mlp\)"):
        NeuronSet.top_k(torch.zeros(4), 0.5)


# ----- set algebra and Jaccard -------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(shape_and_pair_sets())
def test_set_algebra_matches_python_sets(case):
    n_layers, d_mlp, (pa, pb) = case
    a, b = from_pairs(n_layers, d_mlp, pa), from_pairs(n_layers, d_mlp, pb)
    assert set(a | b) == pa | pb
    assert set(a & b) == pa & pb
    assert set(a - b) == pa - pb
    assert set(a ^ b) == pa ^ pb
    assert len(a) == len(pa)
    assert list(a) == sorted(pa)
    assert (a == b) == (pa == pb)
    assert a == from_pairs(n_layers, d_mlp, sorted(pa, reverse=True))
    assert a.counts_per_layer() == [sum(1 for p in pa if p[0] == layer) for layer in range(n_layers)]
    assert a.layers() == sorted({layer for layer, _ in pa})
    for layer in range(n_layers):
        for idx in range(d_mlp):
            assert ((layer, idx) in a) == ((layer, idx) in pa)
    expected = 1.0 if not (pa | pb) else len(pa & pb) / len(pa | pb)
    assert a.jaccard(b) == pytest.approx(expected)
    assert a.jaccard(b) == pytest.approx(b.jaccard(a))
    for layer, value in enumerate(a.jaccard_per_layer(b)):
        la, lb = {p for p in pa if p[0] == layer}, {p for p in pb if p[0] == layer}
        assert value == pytest.approx(1.0 if not (la | lb) else len(la & lb) / len(la | lb))


def test_jaccard_edge_cases():
    empty = NeuronSet.empty(2, 4)
    assert empty.jaccard(empty) == 1.0
    assert empty.jaccard(NeuronSet(2, 4, {0: [1]})) == 0.0
    assert NeuronSet(2, 4, {0: [1]}).jaccard_per_layer(NeuronSet(2, 4, {0: [2]})) == [0.0, 1.0]
    full = NeuronSet.full(2, 4)
    assert full.jaccard(full) == 1.0


def test_equality_ignores_name_and_meta_and_hash_agrees():
    a = NeuronSet(2, 4, {0: [1]}, name="a", meta={"k": 1})
    b = NeuronSet(2, 4, {0: [1]}, name="b")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != NeuronSet(3, 4, {0: [1]})  # other shape: unequal, not an error
    assert a != "not a set"
    assert (a | b).name is None


@pytest.mark.parametrize("op", ["__or__", "__and__", "__sub__", "__xor__", "jaccard", "jaccard_per_layer"])
def test_shape_mismatch_names_both_shapes(op):
    a, b = NeuronSet.empty(2, 48), NeuronSet.empty(3, 48)
    with pytest.raises(ValueError, match=r"NeuronSet shapes differ: \(n_layers=2, d_mlp=48\) vs \(n_layers=3, d_mlp=48\)"):
        getattr(a, op)(b)


def test_operators_reject_non_sets():
    with pytest.raises(TypeError):
        NeuronSet.empty(1, 2) | {(0, 1)}


# ----- random baseline ---------------------------------------------------------------------


def test_random_like_reproducible_counts_and_seed_dependence():
    task = NeuronSet(3, 64, {0: range(10), 2: [1, 5, 9]}, name="sst2")
    before = torch.random.get_rng_state()
    r1, r2, r3 = task.random_like(0), task.random_like(0), task.random_like(1)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert r1 == r2
    assert r1 != r3
    assert r1.counts_per_layer() == task.counts_per_layer() == r3.counts_per_layer()
    assert r1.meta["seed"] == 0 and r1.meta["like"] == "sst2"


@settings(max_examples=40, deadline=None)
@given(shape_and_pair_sets(), st.integers(0, 1000))
def test_random_like_respects_exclude(case, seed):
    n_layers, d_mlp, (pa, pb) = case
    task, exclude = from_pairs(n_layers, d_mlp, pa), from_pairs(n_layers, d_mlp, pb)
    room = [d_mlp - c for c in exclude.counts_per_layer()]
    if any(need > free for need, free in zip(task.counts_per_layer(), room)):
        with pytest.raises(ValueError, match="random_like cannot draw"):
            task.random_like(seed, exclude=exclude)
        return
    drawn = task.random_like(seed, exclude=exclude)
    assert drawn.counts_per_layer() == task.counts_per_layer()
    assert len(drawn & exclude) == 0


def test_random_like_errors():
    task = NeuronSet(2, 4, {1: [0, 1, 2]})
    with pytest.raises(ValueError, match="cannot draw 3 neurons in layer 1: exclude leaves only 2 of d_mlp=4"):
        task.random_like(0, exclude=NeuronSet(2, 4, {1: [0, 3]}))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        task.random_like(-1)
    with pytest.raises(ValueError, match="NeuronSet shapes differ"):
        task.random_like(0, exclude=NeuronSet.empty(2, 5))


# ----- compatibility, tables, repr ---------------------------------------------------------


def test_check_compatible():
    s = NeuronSet.empty(12, 3072)
    s.check_compatible(12, 3072)
    s.check_compatible(12, [3072] * 12)
    with pytest.raises(ValueError, match=r"built for d_mlp=3072 but the model has d_mlp=1536 \(layer 0\)"):
        s.check_compatible(12, 1536)
    with pytest.raises(ValueError, match=r"d_mlp=1536 \(layer 5\)"):
        s.check_compatible(12, [3072] * 5 + [1536] * 7)
    with pytest.raises(ValueError, match="built for n_layers=12 but the model has n_layers=6"):
        s.check_compatible(6, 3072)
    with pytest.raises(ValueError, match="got 3 d_mlp sizes"):
        s.check_compatible(12, [3072] * 3)


def test_dataframes_and_repr():
    s = NeuronSet(3, 4, {0: [2, 1], 2: [3]}, name="qqp")
    df = s.to_dataframe()
    assert list(df.columns) == ["layer", "neuron"]
    assert df.values.tolist() == [[0, 1], [0, 2], [2, 3]]
    assert df.dtypes.tolist() == [np.int64, np.int64]
    assert NeuronSet.empty(2, 3).to_dataframe().shape == (0, 2)
    summary = s.summary_dataframe()
    pd.testing.assert_frame_equal(
        summary, pd.DataFrame({"layer": [0, 1, 2], "count": [2, 0, 1], "fraction": [0.5, 0.0, 0.25]})
    )
    text = repr(s)
    assert "name='qqp'" in text and "n_layers=3" in text and "d_mlp=4" in text and "total=3" in text
    assert "[2, 0, 1]" in text
    assert "..." in repr(NeuronSet.full(20, 2))


# ----- save / load -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".safetensors", ".JSON"])
def test_save_load_round_trip(tmp_path, suffix):
    s = NeuronSet(4, 16, {0: [3, 1], 2: [15], 3: range(16)}, name="sst2", meta={"k": 0.1, "task": {"n": [1, 2]}})
    path = tmp_path / f"set{suffix}"
    s.save(path)
    loaded = NeuronSet.load(str(path))
    assert loaded == s
    assert loaded.name == "sst2" and loaded.meta == s.meta
    empty = NeuronSet.empty(2, 3)
    empty.save(tmp_path / f"empty{suffix}")
    again = NeuronSet.load(tmp_path / f"empty{suffix}")
    assert again == empty and again.name is None and again.meta == {}


def test_json_file_is_readable(tmp_path):
    NeuronSet(2, 4, {1: [2]}, name="x").save(tmp_path / "x.json")
    payload = json.loads((tmp_path / "x.json").read_text())
    assert payload["format_version"] == 1
    assert payload["indices"] == [[], [2]]


def test_load_errors(tmp_path):
    good = {"format_version": 1, "n_layers": 2, "d_mlp": 4, "name": None, "meta": {}, "indices": [[], [1]]}

    def write(name, payload):
        (tmp_path / name).write_text(json.dumps(payload))
        return tmp_path / name

    with pytest.raises(ValueError, match="format_version=2; this tl_taskmap reads format_version=1"):
        NeuronSet.load(write("v2.json", {**good, "format_version": 2}))
    with pytest.raises(ValueError, match="missing field"):
        NeuronSet.load(write("nod.json", {k: v for k, v in good.items() if k != "d_mlp"}))
    with pytest.raises(ValueError, match="missing field.*indices"):
        NeuronSet.load(write("noi.json", {k: v for k, v in good.items() if k != "indices"}))
    with pytest.raises(ValueError, match="one entry per layer"):
        NeuronSet.load(write("short.json", {**good, "indices": [[1]]}))
    with pytest.raises(ValueError, match="layer 1: neuron index 9 is out of range"):
        NeuronSet.load(write("range.json", {**good, "indices": [[], [9]]}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NeuronSet.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown NeuronSet file type '.pt'"):
        NeuronSet.load(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown NeuronSet file type"):
        NeuronSet.empty(1, 1).save(tmp_path / "x.pkl")

    tensors = {"indices": torch.tensor([1]), "offsets": torch.tensor([0, 0, 1])}
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="no 'tl_taskmap.NeuronSet' metadata"):
        NeuronSet.load(tmp_path / "nometa.safetensors")
    header = {k: v for k, v in good.items() if k != "indices"}
    save_file(tensors, str(tmp_path / "v2.safetensors"), {"tl_taskmap.NeuronSet": json.dumps({**header, "format_version": 2})})
    with pytest.raises(ValueError, match="format_version=2"):
        NeuronSet.load(tmp_path / "v2.safetensors")
    save_file({"indices": torch.tensor([1])}, str(tmp_path / "nooff.safetensors"), {"tl_taskmap.NeuronSet": json.dumps(header)})
    with pytest.raises(ValueError, match=r"missing tensor\(s\): \['offsets'\]"):
        NeuronSet.load(tmp_path / "nooff.safetensors")
    bad_offsets = {"indices": torch.tensor([1]), "offsets": torch.tensor([0, 2, 1])}
    save_file(bad_offsets, str(tmp_path / "off.safetensors"), {"tl_taskmap.NeuronSet": json.dumps(header)})
    with pytest.raises(ValueError, match="do not partition"):
        NeuronSet.load(tmp_path / "off.safetensors")
