import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tl_taskmap.stats.cka import feature_space_linear_cka
from tl_taskmap.stats.results import LayerStats
from tl_taskmap.stats.runner import compare_activations
from tl_taskmap.stats.sections import detect_sections

REL = 1e-8


def layered(n=48, layers=3, d_a=10, d_b=6, seed=0, offset=3.0):
    """Two related [layer, n, d] activation stacks (b is a noisy linear image of a), with an offset."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(layers, n, d_a)) * rng.uniform(0.3, 3.0, size=d_a) + offset
    b = np.einsum("lnd,de->lne", a, rng.normal(size=(d_a, d_b))) + rng.normal(size=(layers, n, d_b)) * np.arange(1, layers + 1)[:, None, None]
    return a, b


def svd_count(x, fraction=0.99):
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s), fraction * s.sum()) + 1)


@pytest.fixture(scope="module")
def two_tasks():
    a1, b1 = layered(seed=1)
    a2, b2 = layered(n=40, seed=2)
    s1 = compare_activations(a1, b1, names=("sft", "control"), task="t1", cluster="c1", embedding_layers=[0, 2])
    s2 = compare_activations(a2, b2, names=("sft", "control"), task="t2", cluster="c2", embedding_layers=[0, 2])
    return s1.merge(s2), (a1, b1), (a2, b2)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_equals_dense_reference_per_layer(debiased):
    a, b = layered()
    stats = compare_activations(torch.from_numpy(a), {(layer, "resid_post"): b[layer] for layer in range(3)}, batch_size=7)
    estimator = "debiased" if debiased else "biased"
    expected = [feature_space_linear_cka(a[layer], b[layer], debiased=debiased) for layer in range(3)]
    np.testing.assert_allclose(stats.cka_curve(("a", "b"), estimator=estimator), expected, rtol=REL, atol=0)


def test_dims_for_99_equals_svd_count_and_other_fractions():
    a, b = layered()
    stats = compare_activations(a, b)
    assert stats.dims_for_99("a", task="task").tolist() == [svd_count(a[layer]) for layer in range(3)]
    assert stats.dims_for_99("b", task="task").tolist() == [svd_count(b[layer]) for layer in range(3)]
    assert stats.dims_for_variance("a", 0.9, "task").tolist() == [svd_count(a[layer], 0.9) for layer in range(3)]


def test_to_dataframe_long_format(two_tasks):
    stats = two_tasks[0]
    df = stats.to_dataframe()
    assert list(df.columns) == ["task", "cluster", "layer", "site", "model_pair", "model", "statistic", "estimator", "value"]
    cka = df[df.statistic == "cka"]
    assert len(cka) == 2 * 3 * 1 * 2  # tasks × layers × pairs × estimators
    assert set(cka.model_pair) == {"sft vs control"} and set(cka.estimator) == {"biased", "debiased"}
    spectra = df[df.statistic != "cka"]
    assert len(spectra) == 2 * 3 * 2 * 2  # tasks × layers × models × (dims_99, participation_ratio)
    assert set(df.cluster) == {"c1", "c2"} and set(df.site) == {"resid_post"}
    row = cka[(cka.task == "t2") & (cka.layer == 1) & (cka.estimator == "biased")].value.item()
    assert row == pytest.approx(feature_space_linear_cka(*[x[1] for x in two_tasks[2]]), rel=REL)


def test_cka_curve_pairs_tasks_and_errors(two_tasks):
    stats, (a1, b1), (a2, b2) = two_tasks
    t1 = [feature_space_linear_cka(a1[k], b1[k]) for k in range(3)]
    t2 = [feature_space_linear_cka(a2[k], b2[k]) for k in range(3)]
    np.testing.assert_allclose(stats.cka_curve(("sft", "control")), (np.array(t1) + t2) / 2, rtol=REL)
    np.testing.assert_allclose(stats.cka_curve(("control", "sft"), task="t1"), t1, rtol=REL)
    np.testing.assert_allclose(stats.cka_curve("sft vs control", task="t2"), t2, rtol=REL)
    assert list(stats.cka_by_task("sft vs control").index) == ["t1", "t2"]
    with pytest.raises(KeyError, match="was not compared"):
        stats.cka_curve(("sft", "base"))
    with pytest.raises(KeyError, match="estimator"):
        stats.cka_curve(("sft", "control"), estimator="rbf")
    with pytest.raises(KeyError, match="no model"):
        stats.dims_for_99("base")


def test_self_cka_is_one():
    a, _ = layered()
    stats = compare_activations(a, a.copy())
    np.testing.assert_allclose(stats.cka_curve(("a", "b")), 1.0, rtol=1e-12)
    np.testing.assert_allclose(stats.cka_curve(("a", "b"), estimator="debiased"), 1.0, rtol=1e-12)


def test_task_similarity_is_cosine_of_task_means(two_tasks):
    stats, (a1, _), (a2, _) = two_tasks
    m1, m2 = a1[2].mean(0), a2[2].mean(0)
    expected = m1 @ m2 / (np.linalg.norm(m1) * np.linalg.norm(m2))
    table = stats.task_similarity(2, model="sft")
    assert list(table.index) == ["t1", "t2"] and table.loc["t1", "t2"] == pytest.approx(expected, rel=1e-12)
    centred = stats.task_similarity(2, model="sft", centre=True)
    assert centred.loc["t1", "t2"] == pytest.approx(-1.0)  # two centred vectors are opposite


def test_samples_embedding_and_task_cka():
    a, b = layered(n=30)
    s1 = compare_activations(a, b, task="t1", max_samples_per_task=12, embedding_layers=[1], seed=3)
    s2 = compare_activations(2 * a + 1, b, task="t2", max_samples_per_task=12, embedding_layers=[1], seed=3)
    stats = s1.merge(s2)
    index = stats.tasks["t1"]["sample_index"]
    assert len(index) == 12 and index == sorted(index) and index == stats.tasks["t2"]["sample_index"]
    np.testing.assert_allclose(stats.samples[("t1", "a", "resid_post", 1)].numpy(), a[1][index], rtol=1e-6)
    assert stats.task_cka(1, model="a").loc["t1", "t2"] == pytest.approx(1.0)  # shared inputs, affine image
    frame = stats.embedding(1, model="a", method="pca")
    assert list(frame.columns) == ["task", "cluster", "example", "x", "y"] and len(frame) == 24
    assert frame.example.tolist()[:12] == index
    with pytest.raises(KeyError, match="layers with samples"):
        stats.embedding(0)


def test_save_load_round_trip(tmp_path):
    a, b = layered()
    b[1] = 5.0  # constant layer: its CKA and spectrum are NaN, which must survive as JSON null
    with pytest.warns(UserWarning, match="undefined"):
        stats = compare_activations(a, b, names=("sft", "control"), task="t1", cluster="c1", embedding_layers=[0, 2])
    stats = stats.merge(compare_activations(*layered(n=40, seed=2), names=("sft", "control"), task="t2", cluster="c2"))
    stats.save(tmp_path / "r")
    doc = json.loads((tmp_path / "r" / "layer_stats.json").read_text())
    assert doc["format_version"] == 1 and doc["kind"] == "LayerStats"
    loaded = LayerStats.load(tmp_path / "r")
    pd.testing.assert_frame_equal(loaded.to_dataframe(), stats.to_dataframe())
    assert np.isnan(loaded.cka_curve(("sft", "control"), task="t1")[1])
    for name in ("eigenvalues", "means", "samples"):
        mine, theirs = getattr(stats, name), getattr(loaded, name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.tasks == stats.tasks and loaded.pairs == stats.pairs and repr(loaded) == repr(stats)
    assert loaded.meta == stats.meta
    assert loaded.accumulators is None and not (tmp_path / "r" / "accumulators.safetensors").exists()
    doc["format_version"] = 99
    (tmp_path / "r" / "layer_stats.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="format version 99"):
        LayerStats.load(tmp_path / "r")
    with pytest.raises(ValueError, match="kept no accumulators"):
        stats.save(tmp_path / "s", accumulators=True)


def test_merge_of_shards_equals_one_pass_and_survives_save(tmp_path):
    a, b = layered(n=60)
    whole = compare_activations(a, b, task="t", embedding_layers=None)
    first = compare_activations(a[:, :25], b[:, :25], task="t", keep_accumulators=True, embedding_layers=None)
    second = compare_activations(a[:, 25:], b[:, 25:], task="t", keep_accumulators=True, embedding_layers=None)
    first.save(tmp_path / "shard")
    merged = LayerStats.load(tmp_path / "shard").merge(second)
    assert merged.tasks["t"]["n_examples"] == 60
    for est in ("biased", "debiased"):
        np.testing.assert_allclose(merged.cka_curve(("a", "b"), estimator=est), whole.cka_curve(("a", "b"), estimator=est), rtol=REL)
    assert merged.dims_for_99("a").tolist() == whole.dims_for_99("a").tolist()
    for key, mean in whole.means.items():
        torch.testing.assert_close(merged.means[key], mean, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="keep_accumulators"):
        whole.merge(whole)


def test_mismatched_n_names_both():
    a, b = layered()
    with pytest.raises(ValueError, match=r"'sft' has N=48 but 'control' has N=40"):
        compare_activations(a, b[:, :40], names=("sft", "control"))


def test_too_few_examples_for_debiased():
    a, b = layered(n=3)
    with pytest.raises(ValueError, match="debiased CKA estimator needs at least 4"):
        compare_activations(a, b)
    stats = compare_activations(a, b, estimators=("biased",), embedding_layers=None)
    assert np.all(np.isfinite(stats.cka_curve(("a", "b"))))


def test_float16_inputs_are_computed_in_float64():
    a, b = layered(offset=30.0)
    a16, b16 = torch.from_numpy(a).half(), torch.from_numpy(b).half()
    stats = compare_activations(a16, b16)
    expected = [feature_space_linear_cka(a16[k].double().numpy(), b16[k].double().numpy()) for k in range(3)]
    np.testing.assert_allclose(stats.cka_curve(("a", "b")), expected, rtol=REL)
    assert stats.means[("task", "a", "resid_post", 0)].dtype == torch.float64


def test_nan_rows_are_dropped_from_both_models():
    a, b = layered()
    a[1, 3, 0] = np.nan  # a NaN in one layer of one model drops the row everywhere
    b[0, 7, 2] = np.inf
    with pytest.warns(UserWarning, match="dropped"):
        stats = compare_activations(a, b, batch_size=16)
    keep = np.setdiff1d(np.arange(48), [3, 7])
    expected = [feature_space_linear_cka(a[k][keep], b[k][keep]) for k in range(3)]
    np.testing.assert_allclose(stats.cka_curve(("a", "b")), expected, rtol=REL)
    assert stats.tasks["task"]["n_examples"] == 46 and stats.tasks["task"]["n_dropped"] == 2


def test_constant_features_give_nan_and_a_warning():
    a, b = layered()
    b[1] = 5.0
    with pytest.warns(UserWarning, match="undefined"):
        stats = compare_activations(a, b)
    curve = stats.cka_curve(("a", "b"), task="task")
    assert np.isnan(curve[1]) and np.isfinite(curve[[0, 2]]).all()
    assert math.isnan(stats.spectra[("task", "b", "resid_post", 1)]["dims_99"])


def test_sections_match_detect_sections():
    layers = list(range(8))
    base = np.linspace(0.9, 0.5, 8)
    tuned = np.array([0.87, 0.8, 0.88, 0.95, 0.94, 0.7, 0.65, 0.6])
    cka = {}
    for task, jitter in (("t1", 0.0), ("t2", 0.01)):
        for layer in layers:
            cka[(task, "sft", "control", "resid_post", layer)] = {"biased": tuned[layer] + jitter}
            cka[(task, "base", "control", "resid_post", layer)] = {"biased": base[layer] + jitter}
    stats = LayerStats(tasks={t: {"cluster": "c", "n_examples": 10, "n_dropped": 0, "models": [], "sample_index": []} for t in ("t1", "t2")},
                       models=["sft", "base", "control"], pairs=[("sft", "control"), ("base", "control")],
                       layers={"resid_post": layers}, cka=cka, spectra={}, eigenvalues={}, means={}, samples={},
                       meta={"estimators": ["biased"]})
    expected = detect_sections(np.stack([tuned, tuned + 0.01]), np.stack([base, base + 0.01]), layers=layers)
    got = stats.sections(tuned="sft", base="base")
    assert got == expected and got.transition is not None
    assert stats.sections(tuned="sft", base=None) == detect_sections(np.stack([tuned, tuned + 0.01]), layers=layers)


def test_repr_mentions_contents(two_tasks):
    text = repr(two_tasks[0])
    assert text.startswith("LayerStats(tasks=2") and "sft vs control" in text and "accumulators=no" in text
