"""ablation_matrix: shape, one baseline per task, own-set delta = direct evaluation, save/load, specificity, plot."""

import importlib
import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.models import as_adapter, hook_point_hook_counts, parameter_fingerprint
from tl_taskmap.neurons.ablation import ablate
from tl_taskmap.neurons.ablation_effects import AblationMatrix, ablation_matrix, matched_random_sets, plot_ablation_matrix, specificity
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.stats.inference import crossed_effect, minimum_detectable_drop
from tl_taskmap.tasks import Task

# The package re-exports the function ablation_matrix under the module's name, so fetch the module itself.
matrix_module = importlib.import_module("tl_taskmap.neurons.ablation_effects")

PROMPTS = ["the quick brown fox", "a b c", "good movie", "0 1 2 + 3 =", "bad review", "Question: yes or no"]


def tiny_tasks():
    sentiment = Task.from_lists("sentiment", PROMPTS, [[" good", " bad"][i % 2] for i in range(6)], options=[" good", " bad"])
    qa = Task.from_lists("qa", PROMPTS[::-1], [[" yes", " no", " maybe"][i % 3] for i in range(6)], options=[" yes", " no", " maybe"])
    return [sentiment, qa]


def task_sets(adapter):
    # Global top-k of random scores: the two sets have different per-layer counts.
    gen = torch.Generator().manual_seed(0)
    return {
        name: NeuronSet.top_k(torch.rand(adapter.n_layers, adapter.d_mlp, generator=gen), 0.4, per_layer=False, name=name)
        for name in ("sentiment", "qa")
    }


def counting(monkeypatch, model):
    """Wrap evaluate_task in the matrix module; record (task, whether an ablation hook is on)."""
    calls = []
    real = matrix_module.evaluate_task
    clean = hook_point_hook_counts(model)

    def wrapped(m, task, **kwargs):
        calls.append((task.name, hook_point_hook_counts(model) != clean))
        return real(m, task, **kwargs)

    monkeypatch.setattr(matrix_module, "evaluate_task", wrapped)
    return calls


def assert_intervals_hold(df):
    """Intervals contain their estimate; a cell where no example's score changed has no interval (not [0, 0])."""
    changed = df["n_changed"] > 0
    assert ((df["ci_low"] <= df["delta"] + 1e-12) & (df["delta"] <= df["ci_high"] + 1e-12))[changed].all()
    assert df.loc[~changed, "ci_low"].isna().all() and (df.loc[~changed, "delta"] == 0).all()
    assert (df.loc[~changed, "p_value"] == 1).all()
    assert ((df["loss_ci_low"] <= df["loss_delta"] + 1e-9) & (df["loss_delta"] <= df["loss_ci_high"] + 1e-9)).all()


@pytest.fixture
def warm_llama(bridge_llama):
    a = as_adapter(bridge_llama)
    a.forward(a.tokenize(["warm up"]))  # the bridge adds internal hooks on its first pass
    return bridge_llama


def test_matrix_shape_baselines_once_and_own_delta(warm_llama, monkeypatch):
    model, tasks = warm_llama, tiny_tasks()
    sets = task_sets(as_adapter(model))
    assert sets["sentiment"].counts_per_layer() != sets["qa"].counts_per_layer()
    fingerprint, hooks = parameter_fingerprint(model), hook_point_hook_counts(model)
    calls = counting(monkeypatch, model)
    matrix = ablation_matrix(model, tasks, sets, seeds=2, batch_size=4, progress=False)
    baseline_calls = [name for name, ablating in calls if not ablating]
    assert sorted(baseline_calls) == ["qa", "sentiment"]  # each baseline exactly once
    assert len(calls) == 2 + (2 + 2 * 2) * 2 == matrix.meta["n_evaluations"]
    assert parameter_fingerprint(model) == fingerprint and hook_point_hook_counts(model) == hooks

    df = matrix.to_dataframe()
    assert list(df.columns[:11]) == ["ablated_set", "kind", "seed", "evaluated_task", "metric", "baseline", "ablated",
                                     "delta", "loss_delta", "ci_low", "ci_high"]
    assert len(df) == 2 * 2 + 2 * 2 * 2
    assert df.query("kind == 'task'")["seed"].isna().all() and set(df.query("kind == 'random'")["seed"]) == {0, 1}
    assert_intervals_hold(df)
    table = matrix.delta_table()
    assert table.shape == (4, 2)
    assert list(table.index) == ["sentiment", "qa", "random(sentiment)", "random(qa)"]
    assert list(table.columns) == ["sentiment", "qa"]

    # Own-set cell equals a direct evaluation inside ablate.
    monkeypatch.undo()
    task = tasks[0]
    base = evaluate_task(model, task, batch_size=4)
    with ablate(model, sets["sentiment"]):
        direct = evaluate_task(model, task, batch_size=4)
    cell = df.query("ablated_set == 'sentiment' and kind == 'task' and evaluated_task == 'sentiment'").iloc[0]
    assert cell["delta"] == pytest.approx(direct.metric_value - base.metric_value)
    assert cell["loss_delta"] == pytest.approx(direct.loss - base.loss, abs=1e-6)
    assert cell["loss_delta"] != 0
    assert table.loc["sentiment", "sentiment"] == pytest.approx(cell["delta"])

    # Random rows: the same per-layer counts as their task set; averaged cell = mean over seeds.
    for name, neurons in sets.items():
        assert all(r.counts_per_layer() == neurons.counts_per_layer() for r in matched_random_sets(neurons, [0, 1]))
        per_seed = df.query("ablated_set == @name and kind == 'random' and evaluated_task == 'qa'")
        assert table.loc[f"random({name})", "qa"] == pytest.approx(per_seed["delta"].mean())
        assert (per_seed["n_neurons"] == len(neurons)).all()
    cells = matrix.to_dataframe(per_seed=False)
    assert len(cells) == 8 and cells["seed"].isna().all()
    assert_intervals_hold(cells)
    # The averaged random cell's interval is the crossed examples × seeds one, built from the saved per-example scores.
    recs = [r for r in matrix.records if r["ablated_set"] == "qa" and r["kind"] == "random" and r["evaluated_task"] == "sentiment"]
    d = np.array([r["per_example"] for r in recs]) - np.array(matrix.baselines["sentiment"]["per_example"])
    cell = cells.query("ablated_set == 'qa' and kind == 'random' and evaluated_task == 'sentiment'").iloc[0]
    expected = crossed_effect(d)
    assert cell["n_changed"] == expected.n_differing
    np.testing.assert_allclose([cell["ci_low"], cell["ci_high"]], [expected.low, expected.high], equal_nan=True)
    # Per-example losses and option scores are kept for every evaluation.
    base = evaluate_task(model, tasks[1], batch_size=4)
    np.testing.assert_allclose(matrix.baselines["qa"]["losses"], base.losses, rtol=1e-6)
    np.testing.assert_allclose(matrix.baselines["qa"]["option_scores"], base.option_scores, rtol=1e-6)
    assert all(len(r["losses"]) == 6 and len(r["option_scores"]) == 6 for r in matrix.records)


def test_random_sets_reproducible_and_identical_sets_evaluated_once(warm_llama, monkeypatch):
    model, tasks = warm_llama, tiny_tasks()
    a = as_adapter(model)
    one = NeuronSet(a.n_layers, a.d_mlp, {0: [1, 2], 2: [5]}, name="sentiment")
    same_counts = NeuronSet(a.n_layers, a.d_mlp, {0: [3, 4], 2: [6]}, name="qa")
    assert matched_random_sets(one, [0, 1]) == matched_random_sets(one, [0, 1])
    assert matched_random_sets(one, [0, 1]) != matched_random_sets(one, [2, 3])
    calls = counting(monkeypatch, model)
    matrix = ablation_matrix(model, tasks, {"sentiment": one, "qa": same_counts}, seeds=[0, 1], progress=False)
    # Equal counts + equal seed = the same random set: 2 task sets + 2 shared random sets, 2 tasks each.
    assert len(calls) == 2 + 4 * 2
    df = matrix.to_dataframe()
    a_rows = df.query("ablated_set == 'sentiment' and kind == 'random'").reset_index(drop=True)
    b_rows = df.query("ablated_set == 'qa' and kind == 'random'").reset_index(drop=True)
    pd.testing.assert_series_equal(a_rows["ablated"], b_rows["ablated"])


def test_empty_set_row_is_the_baseline(warm_llama, monkeypatch):
    model, tasks = warm_llama, tiny_tasks()
    a = as_adapter(model)
    calls = counting(monkeypatch, model)
    matrix = ablation_matrix(model, tasks, {"sentiment": NeuronSet.empty(a.n_layers, a.d_mlp)}, seeds=1, progress=False)
    assert len(calls) == 2  # baselines only
    assert (matrix.to_dataframe()["delta"] == 0).all()


def test_matrix_params_mode_matches_zero_mode(any_model):
    a = as_adapter(any_model)
    a.forward(a.tokenize(["warm up"]))
    tasks, sets = tiny_tasks(), task_sets(a)
    zero = ablation_matrix(any_model, tasks, sets, seeds=1, progress=False).to_dataframe()
    params = ablation_matrix(any_model, tasks, sets, seeds=1, mode="params", progress=False).to_dataframe()
    pd.testing.assert_series_equal(zero["delta"], params["delta"])
    np.testing.assert_allclose(zero["loss_delta"], params["loss_delta"], atol=1e-5)


def test_errors_before_any_evaluation(warm_llama, monkeypatch):
    model, tasks = warm_llama, tiny_tasks()
    a = as_adapter(model)
    calls = counting(monkeypatch, model)
    good = NeuronSet(a.n_layers, a.d_mlp, {0: [1]})
    with pytest.raises(ValueError, match=r"neuron_sets\['bad'\].*d_mlp=7.*\(layer 0\)"):
        ablation_matrix(model, tasks, {"good": good, "bad": NeuronSet(a.n_layers, 7)}, progress=False)
    with pytest.raises(ValueError, match="needs mean_activations"):
        ablation_matrix(model, tasks, {"good": good}, mode="mean", progress=False)
    with pytest.raises(ValueError, match="neuron_sets is empty"):
        ablation_matrix(model, tasks, {}, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        ablation_matrix(model, tasks, {"good": good}, seeds=[1, 1], progress=False)
    assert calls == []


@pytest.fixture
def small_matrix(warm_llama):
    return ablation_matrix(warm_llama, tiny_tasks(), task_sets(as_adapter(warm_llama)), seeds=3, progress=False)


def test_save_load_round_trip(small_matrix, tmp_path):
    path = tmp_path / "matrix.json"
    small_matrix.save(path)
    loaded = AblationMatrix.load(path)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    assert loaded.records == small_matrix.records and loaded.baselines == small_matrix.baselines  # losses, option scores
    pd.testing.assert_frame_equal(loaded.to_dataframe(), small_matrix.to_dataframe())
    pd.testing.assert_frame_equal(loaded.delta_table(), small_matrix.delta_table())
    assert loaded.mode == "zero" and loaded.seeds == [0, 1, 2]
    payload = json.loads(path.read_text())
    payload["format_version"] = 99
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="format_version=99"):
        AblationMatrix.load(path)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="not a saved AblationMatrix"):
        AblationMatrix.load(path)
    assert "AblationMatrix(mode='zero'" in repr(small_matrix) and "random(qa)" in repr(small_matrix)


def test_specificity(small_matrix):
    spec = specificity(small_matrix)
    assert list(spec.columns[:14]) == ["task", "metric", "baseline", "own_drop", "random_drop", "other_drop", "vs_random",
                                       "vs_random_low", "vs_random_high", "vs_other", "vs_other_low", "vs_other_high",
                                       "loss_vs_random", "loss_vs_other"]
    assert list(spec.columns) == matrix_module.SPECIFICITY_COLUMNS
    assert list(spec["task"]) == ["sentiment", "qa"]
    df = small_matrix.to_dataframe()
    for _, row in spec.iterrows():
        t = row["task"]
        here = df.query("evaluated_task == @t")
        own = -here.query("ablated_set == @t and kind == 'task'")["delta"].item()
        rand = -here.query("ablated_set == @t and kind == 'random'")["delta"].mean()
        other = -here.query("ablated_set != @t and kind == 'task'")["delta"].mean()
        assert row["own_drop"] == pytest.approx(own) and row["random_drop"] == pytest.approx(rand)
        assert row["vs_random"] == pytest.approx(own - rand) and row["vs_other"] == pytest.approx(own - other)
        for name in ("vs_random", "vs_other"):
            if row[f"{name}_changed"] > 0:
                assert row[f"{name}_low"] <= row[name] + 1e-9 <= row[f"{name}_high"] + 2e-9
            else:  # no example differs: reported as such, not as [0, 0]
                assert math.isnan(row[f"{name}_low"]) and row[name] == 0 and row[f"{name}_p"] == 1
        own_loss = here.query("ablated_set == @t and kind == 'task'")["loss_delta"].item()
        rand_loss = here.query("ablated_set == @t and kind == 'random'")["loss_delta"].mean()
        assert row["loss_vs_random"] == pytest.approx(own_loss - rand_loss)
        assert row["loss_vs_random_low"] <= row["loss_vs_random"] <= row["loss_vs_random_high"]
        assert row["loss_vs_other_low"] <= row["loss_vs_other"] <= row["loss_vs_other_high"]
        assert row["n"] == 6 and row["n_seeds"] == 3
    pd.testing.assert_frame_equal(small_matrix.specificity(), spec)
    # The loss interval is the crossed interval of own(x) − random_s(x), from the saved per-example losses.
    recs = small_matrix.records
    own = np.array([r["losses"] for r in recs if r["evaluated_task"] == "qa" and r["ablated_set"] == "qa" and r["kind"] == "task"])
    rand = np.array([r["losses"] for r in recs if r["evaluated_task"] == "qa" and r["ablated_set"] == "qa" and r["kind"] == "random"])
    expected = crossed_effect(own - rand, bounded=False)
    got = spec.set_index("task").loc["qa"]
    assert (got["loss_vs_random_low"], got["loss_vs_random_high"], got["loss_vs_random_p"]) == pytest.approx(
        (expected.low, expected.high, expected.p_value))


def synthetic_matrix(seed=0, n=80, seeds=5):
    """A matrix built from simulated per-example scores (no model): 2-way tasks 'strong' (70/80 right), 'weak'
    (30/80 right: below chance) and 'frozen' (no ablation changes anything)."""
    rng = np.random.default_rng(seed)
    tasks = {"strong": 70, "weak": 30, "frozen": 60}
    baselines, records = {}, []
    for task, k in tasks.items():
        right = np.zeros(n)
        right[:k] = 1
        losses = rng.uniform(0.2, 2.0, n)
        baselines[task] = {"metric_value": right.mean(), "loss": losses.mean(), "per_example": right.tolist(), "losses": losses.tolist(),
                           "option_scores": rng.normal(size=(n, 2)).tolist(), "chance": 0.5, "n": n}
        for name in tasks:
            rows = [("task", None)] + [("random", s) for s in range(seeds)]
            for kind, s in rows:
                flip = 0.0 if task == "frozen" else (0.4 if (kind == "task" and name == task) else 0.1)
                after = np.where(rng.random(n) < flip, 0.0, right)
                after_losses = losses + (0 if task == "frozen" else rng.uniform(0, 1 + 3 * (flip > 0.2), n))
                records.append({"ablated_set": name, "kind": kind, "seed": s, "evaluated_task": task, "metric_value": after.mean(),
                                "loss": after_losses.mean(), "per_example": after.tolist(), "losses": after_losses.tolist(),
                                "option_scores": [[0.0, 0.0]] * n, "n_neurons": 10})
    return AblationMatrix(mode="zero", tasks=list(tasks), metrics={t: "accuracy" for t in tasks}, set_names=list(tasks),
                          seeds=list(range(seeds)), baselines=baselines, records=records)


def test_above_chance_is_an_exact_binomial_test_with_holm():
    from scipy import stats

    tests = matrix_module.above_chance_tests(synthetic_matrix()).set_index("task")
    for task, k in (("strong", 70), ("weak", 30), ("frozen", 60)):
        assert tests.loc[task, "p_above_chance"] == pytest.approx(stats.binomtest(k, 80, 0.5, alternative="greater").pvalue)
    raw = tests["p_above_chance"].to_numpy()
    order = np.argsort(raw)  # Holm by hand for three tests
    by_hand = np.empty(3)
    by_hand[order] = np.minimum(1, np.maximum.accumulate(raw[order] * np.array([3, 2, 1])))
    np.testing.assert_allclose(tests["p_above_chance_holm"], by_hand)
    assert tests["above_chance"].tolist() == [True, False, True]


def test_task_below_chance_is_flagged_and_left_out_of_the_holm_family():
    spec = specificity(synthetic_matrix()).set_index("task")
    assert spec["above_chance"].tolist() == [True, False, True]
    assert math.isnan(spec.loc["weak", "vs_random_p_holm"]) and not math.isnan(spec.loc["weak", "vs_random_p"])
    # The family is the two tasks above chance: 'frozen' has p = 1 (nothing changed), so strong's adjusted p is 2·p.
    assert spec.loc["strong", "vs_random_p_holm"] == pytest.approx(min(1, 2 * spec.loc["strong", "vs_random_p"]))
    assert spec.loc["strong", "vs_random_low"] > 0  # own set flips 40%, random sets 10%


def test_no_prediction_flipped_has_no_zero_width_interval():
    spec = specificity(synthetic_matrix()).set_index("task")
    frozen = spec.loc["frozen"]
    assert frozen["own_changed"] == 0 and frozen["vs_random_changed"] == 0 and frozen["vs_other_changed"] == 0
    assert frozen["vs_random"] == 0 and math.isnan(frozen["vs_random_low"]) and math.isnan(frozen["vs_random_high"])
    assert frozen["vs_random_p"] == 1.0
    cells = synthetic_matrix().to_dataframe(per_seed=False).query("evaluated_task == 'frozen'")
    assert (cells["n_changed"] == 0).all() and cells["ci_low"].isna().all()


def test_minimum_detectable_drop_column():
    matrix = synthetic_matrix()
    spec = specificity(matrix).set_index("task")
    right = np.array(matrix.baselines["strong"]["per_example"]) == 1
    rand = [r for r in matrix.records if r["evaluated_task"] == "strong" and r["ablated_set"] == "strong" and r["kind"] == "random"]
    rate = np.mean([np.mean(np.array(r["per_example"])[right] == 0) for r in rand])
    assert spec.loc["strong", "random_flip_rate"] == pytest.approx(rate)
    mde = spec.loc["strong", "mde_80"]
    assert minimum_detectable_drop(80, accuracy=70 / 80, random_flip_rate=rate, n_seeds=5) <= mde < 0.3
    assert minimum_detectable_drop(80, accuracy=70 / 80, random_flip_rate=rate, n_seeds=5, seed_sd=0.2) > mde


def test_format_1_matrix_still_loads_without_loss_intervals(tmp_path):
    payload = synthetic_matrix().to_dict()
    payload["format_version"] = 1
    for entry in [*payload["baselines"].values(), *payload["records"]]:
        entry.pop("losses"), entry.pop("option_scores"), entry.pop("chance", None), entry.pop("n", None)
    (tmp_path / "old.json").write_text(json.dumps(payload))
    old = AblationMatrix.load(tmp_path / "old.json")
    spec = specificity(old)
    assert spec["loss_vs_random_low"].isna().all() and spec["vs_random_low"].notna().any()
    assert spec["above_chance"].isna().all()  # no chance level saved: nothing is flagged


def test_specificity_without_random_or_other_rows(warm_llama):
    tasks = tiny_tasks()
    sets = task_sets(as_adapter(warm_llama))
    matrix = ablation_matrix(warm_llama, tasks, {"qa": sets["qa"]}, seeds=0, progress=False)
    spec = specificity(matrix)
    assert list(spec["task"]) == ["qa"]
    assert math.isnan(spec["vs_random"].item()) and math.isnan(spec["vs_other"].item())
    assert matrix.delta_table().shape == (1, 2)


def test_plot(small_matrix):
    import matplotlib.pyplot as plt

    ax = plot_ablation_matrix(small_matrix)
    assert len(ax.images) == 1
    image = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(image), small_matrix.delta_table().to_numpy(dtype=float))
    assert [t.get_text() for t in ax.get_yticklabels()] == small_matrix.row_labels()
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi  # centred on zero
    assert small_matrix.plot(value="loss_delta") is not None
    plt.close("all")


def test_mean_mode_with_zero_means_equals_zero_mode(warm_llama):
    a = as_adapter(warm_llama)
    tasks, sets = tiny_tasks(), task_sets(a)
    zero = ablation_matrix(warm_llama, tasks, sets, seeds=1, progress=False)
    mean = ablation_matrix(warm_llama, tasks, sets, seeds=1, mode="mean", mean_activations=torch.zeros(a.n_layers, a.d_mlp), progress=False)
    assert mean.mode == "mean"
    pd.testing.assert_frame_equal(zero.to_dataframe(), mean.to_dataframe())


def test_given_baselines_skip_the_baseline_passes_and_give_the_same_matrix(warm_llama, monkeypatch):
    model, tasks = warm_llama, tiny_tasks()
    sets = task_sets(as_adapter(model))
    reference = ablation_matrix(model, tasks, sets, seeds=1, batch_size=4, progress=False)
    baselines = {t.name: evaluate_task(model, t, batch_size=4) for t in tasks}
    calls = counting(monkeypatch, model)
    given = ablation_matrix(model, tasks, sets, seeds=1, batch_size=4, progress=False, baselines=baselines)
    assert all(ablating for _, ablating in calls)  # no unablated evaluation ran
    assert len(calls) == given.meta["n_evaluations"] == reference.meta["n_evaluations"] - len(tasks)
    assert given.baselines == reference.baselines and given.records == reference.records
    pd.testing.assert_frame_equal(given.to_dataframe(), reference.to_dataframe())


def test_baselines_of_other_tasks_are_refused(warm_llama):
    model, tasks = warm_llama, tiny_tasks()
    sets = task_sets(as_adapter(model))
    score = evaluate_task(model, tasks[0], batch_size=4)
    with pytest.raises(ValueError, match="no score for tasks \\['qa'\\]"):
        ablation_matrix(model, tasks, sets, seeds=0, progress=False, baselines={"sentiment": score})
    with pytest.raises(ValueError, match="is not a score of this task"):
        ablation_matrix(model, tasks, sets, seeds=0, progress=False, baselines={"sentiment": score, "qa": score})
