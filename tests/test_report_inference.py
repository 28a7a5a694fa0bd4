"""The report's statistics on a tiny model: binomial p-values, Holm-corrected counts, loss effects with intervals,
power per task, and findings that each rest on a test."""

import re

import pandas as pd
import pytest
from scipy import stats

from tests.test_report import tiny_config, write_tasks
from tl_taskmap.report import map_model
from tl_taskmap.stats.inference import holm


@pytest.fixture(scope="module")
def report(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("report_inference")
    config = tiny_config(root / "out", write_tasks(root / "tasks"), examples=12, seeds=3, train_controls=0)
    return map_model(config, progress=False, log=lambda message: None)


def text_of(report) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", report.html.read_text(encoding="utf-8")))


@pytest.mark.slow
def test_baseline_has_exact_binomial_tests_with_holm(report):
    baseline = report.baseline()
    for row in baseline.itertuples():
        k = round(row.metric_value * row.n)
        assert row.n_correct == k
        assert row.p_above_chance == pytest.approx(stats.binomtest(k, row.n, row.chance, alternative="greater").pvalue)
    assert baseline["p_above_chance_holm"].tolist() == pytest.approx(holm(baseline["p_above_chance"]).tolist())
    assert (report.out / "baseline_examples.json").is_file()


@pytest.mark.slow
def test_specificity_has_loss_intervals_power_and_flags(report):
    spec = pd.read_csv(report.out / "ablation" / "specificity.csv")
    assert (spec["mde_80"].isna() | (spec["mde_80"] > 0)).all()  # NaN: no drop is detectable at this n (said on the page)
    assert spec["loss_vs_random_low"].notna().all() and (spec["loss_vs_random_low"] <= spec["loss_vs_random"]).all()
    assert spec["above_chance"].notna().all()
    matrix = report.ablation()
    assert all(r["losses"] and r["option_scores"] for r in matrix.records)


@pytest.mark.slow
def test_page_states_tests_counts_intervals_and_power(report):
    page = text_of(report)
    findings = page.split("Findings", 2)[2].split("Tasks and baseline")[0]
    assert "exact one-sided binomial test per task, Holm-corrected over the 2 tasks" in findings
    assert re.search(r"Above chance \(model\): \d of 2 multiple-choice tasks", findings)
    spec = pd.read_csv(report.out / "ablation" / "specificity.csv")
    if spec["above_chance"].any():
        assert "Holm over" in findings and "crossed examples × 3 random seeds" in findings and "answer loss" in findings.lower()
    else:  # a random tiny model learned nothing: no effect is claimed, and the page says why
        assert "No task is above chance, so no ablation effect is claimed" in findings
    assert "Power:" in findings
    assert "Descriptive summaries" in findings  # point estimates are kept apart from the findings
    assert "p_above_chance_holm" in page and "detectable drop (80% power)" in page and "loss: own − random [95% CI]" in page
    for row in spec.itertuples():
        if row.mde_80 != row.mde_80 and row.baseline > 0:
            assert f"For {row.task}" in findings and "no drop is detectable" in findings
        if not row.above_chance:
            assert row.task in findings.split("Not above chance")[1]


def test_findings_from_tests_on_a_simulated_matrix():
    from tests.neurons.test_ablation_matrix import synthetic_matrix
    from tl_taskmap.neurons.ablation_effects import specificity, specificity_effects
    from tl_taskmap.report.html import _tested_findings
    from tl_taskmap.stats.inference import above_chance_table, combine_effects

    matrix = synthetic_matrix()
    spec = specificity(matrix)
    baseline = above_chance_table(pd.DataFrame([{"model": "model", "task": t, "metric": "accuracy", "metric_value": b["metric_value"],
                                                 "n": 80, "chance": 0.5} for t, b in matrix.baselines.items()]), by="model")
    effects = specificity_effects(matrix)
    items = _tested_findings(baseline, spec, effects, 0.05)
    above, vs_random = items[0], items[1]
    assert above.startswith("Above chance (model): 2 of 3 multiple-choice tasks") and "Not above chance" in above and "weak" in above
    # 'weak' is left out: the family is strong + frozen; strong is significant, frozen has no change at all.
    assert "Holm over 2 tasks above chance" in vs_random and "for 1 of 2 tasks" in vs_random
    pooled = combine_effects([effects["strong"]["vs_random"], effects["frozen"]["vs_random"]])
    assert pooled.describe() in vs_random and "weak" not in vs_random
    assert "frozen no example differs (0 of 80)" in vs_random
    s = spec.set_index("task").loc["strong"]
    assert f"strong {s['vs_random']:+.3f} [{s['vs_random_low']:+.3f}, {s['vs_random_high']:+.3f}]" in vs_random
    assert any(i.startswith("Answer loss, own vs matched random neurons") for i in items)
    assert items[-1].startswith("Power: with n = 80 evaluation examples and 5 random seeds")
