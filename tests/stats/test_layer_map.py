"""Layer map against null controls: the paired CKA-difference bootstrap, and the rule on trained tiny models."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tl_taskmap.stats.cka import feature_space_linear_cka
from tl_taskmap.stats.layer_map import (
    cka_difference_by_layer,
    linear_cka_from_grams,
    paper_pair,
    task_vs_null,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def last_letter_task(n: int, seed: int = 0, name: str = "last_letter"):
    """A learnable two-way task: ' yes' when the prompt's last letter comes before 'n'."""
    from tl_taskmap.tasks import Task

    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(LETTERS) for _ in range(4)) for _ in range(n)]
    return Task.from_lists(name, prompts, [" yes" if p[-1] < "n" else " no" for p in prompts], options=[" yes", " no"])


def test_gram_cka_matches_feature_space_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(25, 7)), rng.normal(size=(25, 4))
    y[:, :2] += x[:, :2]
    assert linear_cka_from_grams(x @ x.T, y @ y.T) == pytest.approx(feature_space_linear_cka(x, y), abs=1e-12)


def test_bootstrap_rows_are_shared_so_identical_pairs_give_zero():
    rng = np.random.default_rng(1)
    x, y = [rng.normal(size=(30, 5))], [rng.normal(size=(30, 5))]
    diff = cka_difference_by_layer((x, y), (x, y), n_boot=200)
    row = diff.frame.iloc[0]
    assert row["diff"] == 0 and row["low"] == 0 and row["high"] == 0 and not row["positive"]


def test_interval_covers_a_simulated_difference_and_detects_a_real_one():
    """Null simulation: two controls drawn from the same process; their difference interval must cover 0 jointly
    (Bonferroni over layers) in ≥ 90% of repeats. A real difference (one control rotated into noise) is found."""
    rng = np.random.default_rng(2)
    n, d, layers, repeats = 40, 6, 3, 40
    false = 0
    for _ in range(repeats):
        model = [rng.normal(size=(n, d)) for _ in range(layers)]
        c1 = [m + 0.7 * rng.normal(size=(n, d)) for m in model]
        c2 = [m + 0.7 * rng.normal(size=(n, d)) for m in model]
        false += bool(task_vs_null(model, c1, c2, n_boot=200, seed=int(rng.integers(1e9))).task_specific_layers())
    assert false / repeats <= 0.10
    model = [rng.normal(size=(n, d)) for _ in range(layers)]
    null = [m + 0.3 * rng.normal(size=(n, d)) for m in model]
    control = [m + 0.3 * rng.normal(size=(n, d)) for m in model]
    control[1] = rng.normal(size=(n, d))  # the task control moved layer 1 only
    assert task_vs_null(model, control, null, n_boot=300).task_specific_layers() == [1]


def test_bad_inputs_name_the_problem():
    x = [np.zeros((10, 3)) + np.arange(3)]
    with pytest.raises(ValueError, match="same examples"):
        task_vs_null(x, x, [np.ones((9, 3))], n_boot=100)
    with pytest.raises(ValueError, match="layers"):
        task_vs_null(x, x, {1: x[0]}, n_boot=100)
    with pytest.raises(ValueError, match="NaN"):
        task_vs_null(x, x, [np.full((10, 3), np.nan)], n_boot=100)
    with pytest.raises(ValueError, match="n_boot"):
        task_vs_null(x, x, x, n_boot=10)
    with pytest.raises(ValueError, match="no activations"):
        paper_pair({}, {}, {"t": x})


def test_shuffled_answers_keep_prompts_and_answer_counts():
    from tl_taskmap.neurons.masked_training import shuffled_answers
    from tl_taskmap.tasks import Task

    task = last_letter_task(40)
    null = shuffled_answers(task, seed=3)
    assert null.prompts == task.prompts and sorted(null.targets) == sorted(task.targets)
    assert null.targets != task.targets and all(e.target in e.options for e in null.examples)
    gen = Task.from_lists("gen", ["a", "b", "c"], [" x", " y", " z"])
    assert sorted(shuffled_answers(gen, seed=0).targets) == [" x", " y", " z"]


def _last_token_layers(model, task):
    from tl_taskmap.activations import capture

    return capture(model, task.prompts, sites="resid_post", reduce="last", progress=False).stack("resid_post").double().numpy()


@pytest.mark.slow
def test_layer_map_rule_finds_task_layers_for_a_learned_task_and_none_for_a_shuffled_control():
    """The issue's acceptance test on a tiny GPT-2 bridge.

    The base model first learns the answer format (a fine-tune on shuffled answers, as an instruction-tuned
    model already answers with the options), so what remains for a control is the task itself. The task
    control then learns the task (held-out accuracy 1.0 here) and departs from the model more than a null
    control at every layer; a second null control (other shuffle) is not told apart from the first.
    """
    from tests import tiny_models
    from tl_taskmap.evaluate import evaluate_task
    from tl_taskmap.neurons.masked_training import train_control_model, train_null_control_model

    selection, evaluation = last_letter_task(180).split(2 / 3, seed=0)
    base = train_null_control_model(tiny_models.bridge("gpt2"), selection, shuffle_seed=99, steps=60, lr=1e-3, seed=1, progress=False)
    settings = dict(steps=100, lr=1e-3, batch_size=8, seed=0, progress=False)
    control = train_control_model(base, selection, **settings)
    null_1 = train_null_control_model(base, selection, shuffle_seed=1, **settings)
    null_2 = train_null_control_model(base, selection, shuffle_seed=2, **settings)
    assert evaluate_task(control, evaluation).metric_value >= 0.9
    assert evaluate_task(null_1, evaluation).metric_value <= 0.7
    acts = {name: _last_token_layers(m, evaluation) for name, m in
            (("base", base), ("control", control), ("null_1", null_1), ("null_2", null_2))}
    learned = task_vs_null(acts["base"], acts["control"], acts["null_1"], n_boot=500)
    shuffled = task_vs_null(acts["base"], acts["null_2"], acts["null_1"], n_boot=500)
    assert learned.task_specific_layers() == [0, 1, 2], learned.frame
    assert shuffled.task_specific_layers() == [], shuffled.frame
    assert "Bonferroni over 3 layers" in learned.rule
