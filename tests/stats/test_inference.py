"""stats.inference: binomial test vs scipy, Holm vs hand computation, crossed interval calibration by simulation,
no-difference handling, power of the minimum detectable drop by simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from tl_taskmap.stats.inference import (
    Effect,
    binomial_above_chance,
    clopper_pearson_upper,
    combine_effects,
    crossed_effect,
    crossed_intervals,
    holm,
    minimum_detectable_drop,
)

DEFAULT_N, DEFAULT_SEEDS, REPS = 80, 5, 4000


@pytest.mark.parametrize("n,chance", [(12, 0.5), (40, 0.25), (80, 1 / 3), (7, 0.1)])
def test_binomial_matches_scipy_binomtest(n, chance):
    for k in range(n + 1):
        expected = stats.binomtest(k, n, chance, alternative="greater").pvalue
        assert binomial_above_chance(k, n, chance) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_binomial_rejects_bad_input():
    with pytest.raises(ValueError, match="n_correct"):
        binomial_above_chance(13, 12, 0.5)
    with pytest.raises(ValueError, match="chance"):
        binomial_above_chance(3, 12, 1.0)


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06.
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    out = holm([0.01, float("nan"), 0.02])  # NaN is not part of the family: m = 2
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])
    assert math.isnan(out[1])
    assert holm([]).size == 0


def test_holm_matches_its_definition_on_random_p_values():
    rng = np.random.default_rng(1)
    for _ in range(50):
        p = rng.random(rng.integers(1, 9)) ** 3
        m = len(p)
        order = np.argsort(p)
        expected = np.empty(m)
        for rank, i in enumerate(order):  # adjusted p_(i) = max over j ≤ i of min(1, (m − j) p_(j))
            expected[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
        np.testing.assert_allclose(holm(p), expected)


def binary_tables(rng, reps, n, rows, own_rate, seed_rates):
    """Simulated 0/1 accuracies after ablating random sets (rows) and the own set, for ``reps`` runs.

    80% of examples are answered right; example fragility f ∈ {0.5, 1.5} (mean 1) scales every set's chance of
    turning a right answer wrong (own: ``own_rate·f``; random row s: ``q_s·f``); 2% of wrong answers turn right
    under any ablation. Returns ``random − own`` per example: its expectation is ``0.8·(own_rate − E q)``.
    """
    right = rng.random((reps, 1, n)) < 0.8
    fragility = np.where(rng.random((reps, 1, n)) < 0.5, 0.5, 1.5)
    own = np.where(right, rng.random((reps, 1, n)) >= own_rate * fragility, rng.random((reps, 1, n)) < 0.02)
    q = seed_rates[:, :, None]
    rand = np.where(right, rng.random((reps, rows, n)) >= q * fragility, rng.random((reps, rows, n)) < 0.02)
    return rand.astype(float) - own.astype(float)


def coverage(out, true):
    return float(np.mean((out["low"] <= true) & (true <= out["high"])))


@pytest.mark.parametrize("scenario", ["seed-heavy", "example-heavy", "no-effect", "fixed-rows"])
def test_intervals_cover_95_percent_at_the_default_n(scenario):
    """Known effect, the report's default design (80 examples, 5 random seeds): 95% intervals cover 93–97%."""
    rng = np.random.default_rng(["seed-heavy", "example-heavy", "no-effect", "fixed-rows"].index(scenario))
    if scenario == "seed-heavy":  # random sets differ a lot in how much they hurt: q_s ~ U(0, 0.3)
        d, true, random_rows = binary_tables(rng, REPS, DEFAULT_N, DEFAULT_SEEDS, 0.25, rng.uniform(0, 0.3, (REPS, DEFAULT_SEEDS))), 0.08, True
    elif scenario == "example-heavy":  # every random set alike: only examples vary
        d, true, random_rows = binary_tables(rng, REPS, DEFAULT_N, DEFAULT_SEEDS, 0.3, np.full((REPS, DEFAULT_SEEDS), 0.1)), 0.16, True
    elif scenario == "no-effect":
        d, true, random_rows = binary_tables(rng, REPS, DEFAULT_N, DEFAULT_SEEDS, 0.15, rng.uniform(0, 0.3, (REPS, DEFAULT_SEEDS))), 0.0, True
    else:  # the other tasks' sets: three fixed rows, the estimand is conditional on them
        d, true, random_rows = binary_tables(rng, REPS, DEFAULT_N, 3, 0.25, np.tile([0.05, 0.15, 0.1], (REPS, 1))), 0.12, False
    out = crossed_intervals(d, random_rows=random_rows)
    assert 0.93 <= coverage(out, true) <= 0.97, coverage(out, true)


def test_intervals_cover_gaussian_crossed_design_with_strong_seed_effects():
    rng = np.random.default_rng(7)
    d = 0.1 + rng.normal(0, 1, (REPS, 1, 80)) + rng.normal(0, 0.3, (REPS, 5, 1)) + rng.normal(0, 0.5, (REPS, 5, 80))
    out = crossed_intervals(d)
    assert 0.93 <= coverage(out, 0.1) <= 0.97
    # Ignoring the seeds (a paired interval over examples of the seed means) under-covers here.
    naive = crossed_intervals(d.mean(1, keepdims=True))
    assert coverage(naive, 0.1) < 0.90


def test_crossed_variance_matches_a_loop_anova():
    rng = np.random.default_rng(3)
    d = rng.normal(size=(4, 9)) + rng.normal(size=(4, 1)) + rng.normal(size=(1, 9))
    S, n = d.shape
    grand = d.mean()
    ms_ex = S * sum((d[:, i].mean() - grand) ** 2 for i in range(n)) / (n - 1)
    ms_seed = n * sum((d[s].mean() - grand) ** 2 for s in range(S)) / (S - 1)
    ms_res = sum((d[s, i] - d[s].mean() - d[:, i].mean() + grand) ** 2 for s in range(S) for i in range(n)) / ((n - 1) * (S - 1))
    assert ms_ex > ms_res and ms_seed > ms_res
    var = (ms_ex + ms_seed - ms_res) / (n * S)
    terms = [(ms_ex / (n * S)) ** 2 / (n - 1), (ms_seed / (n * S)) ** 2 / (S - 1), (ms_res / (n * S)) ** 2 / ((n - 1) * (S - 1))]
    df = var ** 2 / sum(terms)
    effect = crossed_effect(d)
    assert effect.se == pytest.approx(math.sqrt(var)) and effect.df == pytest.approx(df)
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    assert (effect.low, effect.high) == pytest.approx((grand - half, grand + half))
    assert effect.significant == (effect.p_value < 0.05) == (effect.low > 0 or effect.high < 0)


def test_one_row_and_fixed_rows_are_a_paired_t_test():
    rng = np.random.default_rng(4)
    d = rng.normal(0.2, 1, size=(3, 30))
    for effect, data in ((crossed_effect(d[:1]), d[0]), (crossed_effect(d, random_rows=False), d.mean(0))):
        test = stats.ttest_1samp(data, 0.0)
        assert effect.p_value == pytest.approx(test.pvalue) and effect.df == len(data) - 1
        low, high = test.confidence_interval(0.95)
        assert (effect.low, effect.high) == pytest.approx((low, high))


def test_no_difference_is_reported_as_such_not_as_a_zero_width_interval():
    effect = crossed_effect(np.zeros((5, 80)))
    assert effect.no_difference and effect.n_differing == 0
    assert math.isnan(effect.low) and math.isnan(effect.high) and effect.p_value == 1.0 and not effect.significant
    assert effect.bound == pytest.approx(1 - 0.025 ** (1 / 80)) == pytest.approx(clopper_pearson_upper(0, 80))
    assert effect.describe().startswith("no example differs (0 of 80)") and "0.045" in effect.describe()
    assert math.isnan(crossed_effect(np.zeros((1, 10)), bounded=False).bound)
    # One example that differs is an ordinary (wide) interval.
    d = np.zeros((5, 80))
    d[:, 3] = 1
    one = crossed_effect(d)
    assert one.n_differing == 1 and one.low < one.estimate < one.high


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="≥ 2 examples"):
        crossed_effect([[1.0]])
    with pytest.raises(ValueError, match="NaN"):
        crossed_effect([[1.0, math.nan]])


def test_combine_effects_welch():
    a, b = crossed_effect([[1, 0, 1, 1, 0, 1]]), crossed_effect([[0, 1, 0, 0, 1, 1, 0]])
    both = combine_effects([a, b])
    var = (a.se ** 2 + b.se ** 2) / 4
    df = var ** 2 / ((a.se ** 2 / 4) ** 2 / a.df + (b.se ** 2 / 4) ** 2 / b.df)
    assert both.estimate == pytest.approx((a.estimate + b.estimate) / 2) and both.se == pytest.approx(math.sqrt(var))
    assert both.df == pytest.approx(df) and both.n_rows == 2
    assert combine_effects([]) is None
    assert combine_effects([crossed_effect([[0, 0]])]).no_difference
    assert isinstance(repr(both), str) and "mean over 2 tasks" in repr(both)


def test_minimum_detectable_drop_closed_form_and_monotone():
    k2 = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2
    for n in (12, 40, 80, 400):  # accuracy 1, no random flips: δ = k·sqrt(δ(1−δ)/n) → δ = k²/(n + k²)
        assert minimum_detectable_drop(n) == pytest.approx(k2 / (n + k2), rel=1e-6)
    values = [minimum_detectable_drop(n, accuracy=0.8, random_flip_rate=0.1, n_seeds=5) for n in (12, 40, 80, 200)]
    assert values == sorted(values, reverse=True)
    assert minimum_detectable_drop(80, accuracy=0.8, random_flip_rate=0.1, n_seeds=5, seed_sd=0.05) > values[2]
    assert math.isnan(minimum_detectable_drop(4, accuracy=0.3, random_flip_rate=0.5))


def test_minimum_detectable_drop_has_the_stated_power_in_simulation():
    rng = np.random.default_rng(5)
    accuracy, q, seeds = 0.8, 0.1, DEFAULT_SEEDS
    delta = minimum_detectable_drop(DEFAULT_N, accuracy=accuracy, random_flip_rate=q, n_seeds=seeds)
    right = rng.random((REPS, 1, DEFAULT_N)) < accuracy
    own = right & (rng.random((REPS, 1, DEFAULT_N)) >= q + delta / accuracy)
    rand = right & (rng.random((REPS, seeds, DEFAULT_N)) >= q)
    power = float(np.mean(crossed_intervals(rand.astype(float) - own.astype(float))["low"] > 0))
    assert 0.75 <= power <= 0.85, power


def test_effect_repr_and_dict():
    effect = crossed_effect([[1, 0, 1, 0], [1, 1, 0, 0]])
    assert isinstance(effect, Effect) and "n=4" in repr(effect) and effect.to_dict()["n_rows"] == 2


def test_above_chance_table_holm_per_model_and_untestable_rows():
    import pandas as pd

    from tl_taskmap.stats.inference import above_chance_table

    frame = pd.DataFrame({"model": ["a", "a", "a", "b"], "metric": ["accuracy", "accuracy", "rouge_l", "accuracy"],
                          "metric_value": [0.75, 7 / 12, 0.4, 0.75], "n": [40, 12, 10, 40], "chance": [0.5, 0.5, None, 0.5]})
    out = above_chance_table(frame, by="model")
    p = [stats.binomtest(30, 40, 0.5, alternative="greater").pvalue, stats.binomtest(7, 12, 0.5, alternative="greater").pvalue]
    np.testing.assert_allclose(out["p_above_chance"][:2], p)
    assert math.isnan(out["p_above_chance"][2])  # no chance level: no test, and not in the family
    np.testing.assert_allclose(out["p_above_chance_holm"][:2], holm(p))
    assert out["p_above_chance_holm"][3] == pytest.approx(p[0])  # model b is its own family of one
    assert out["above_chance"].tolist()[:2] == [True, False] and out["above_chance"].isna().tolist()[2]
    assert list(out["n_correct"]) == [30, 7, 4, 30]
