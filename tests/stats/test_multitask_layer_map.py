"""The paper's pair made offline: a multi-task fine-tune of a tiny model, its cache, and the layer map on it."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from tests.stats.test_layer_map import LETTERS, last_letter_task
from tl_taskmap.tasks import Task, TaskSuite


def first_letter_task(n: int, seed: int = 1) -> Task:
    """A second learnable task: ' true' when the prompt's first letter comes before 'n'."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(LETTERS) for _ in range(3)) + " ?" for _ in range(n)]
    return Task.from_lists("first_letter", prompts, [" true" if p[0] < "n" else " false" for p in prompts],
                           options=[" true", " false"])


@pytest.fixture(scope="module")
def suites():
    return TaskSuite([last_letter_task(120), first_letter_task(120)]).split(0.5, seed=0)


@pytest.fixture(scope="module")
def base():
    from tests import tiny_models

    return tiny_models.bridge("gpt2")


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_multitask_union_interleaves_nothing_out_and_rejects_unknown_holdout(suites):
    from tl_taskmap.neurons.multitask import multitask_union

    selection, _ = suites
    union = multitask_union(list(selection))
    assert len(union) == sum(len(t) for t in selection) and union.meta["tasks"] == selection.names
    assert multitask_union(list(selection), held_out=["first_letter"]).meta["tasks"] == ["last_letter"]
    with pytest.raises(ValueError, match="not in the suite"):
        multitask_union(list(selection), held_out=["nope"])
    with pytest.raises(ValueError, match="every task is held out"):
        multitask_union(list(selection), held_out=selection.names)


def test_multitask_cache_reuse_and_invalidation(tmp_path, suites, base):
    from tl_taskmap.models import parameter_fingerprint
    from tl_taskmap.neurons.multitask import cached_multitask_keys, multitask_model, multitask_settings

    selection, _ = suites
    before = parameter_fingerprint(base)
    kw = dict(cache_dir=tmp_path, steps=3, lr=1e-3, batch_size=8, seed=0, progress=False)
    first = multitask_model(base, selection, **kw)
    assert not first.cached and (first.folder / "weights.safetensors").is_file()
    assert parameter_fingerprint(base) == before  # the base is never changed
    again = multitask_model(base, selection, **kw)
    assert again.cached and again.key == first.key
    for name, value in _params(first.model).items():
        assert torch.equal(value, dict(again.model.named_parameters())[name]), name
    assert cached_multitask_keys(tmp_path, list(selection), multitask_settings(3, 1e-3, 8, 0, [])) == [first.key]
    # A changed task (one answer flipped) and a changed setting each name a new model.
    changed = list(selection)
    flipped = changed[0].examples[0]
    other = " no" if flipped.target == " yes" else " yes"
    changed[0] = Task(changed[0].name, [type(flipped)(flipped.prompt, other, flipped.options)] + changed[0].examples[1:],
                      cluster=changed[0].cluster)
    assert multitask_model(base, changed, **kw).key != first.key
    assert multitask_model(base, selection, **{**kw, "steps": 4}).key != first.key
    assert multitask_model(base, selection, **kw, held_out=["first_letter"]).trained_on == ["last_letter"]


@pytest.mark.slow
def test_paper_pair_end_to_end_on_a_multitask_model(tmp_path, suites, base):
    """Multi-task model trained on both tasks (it must learn them), controls + null controls, the pair, the null
    pair, the section rule with its thresholds, and the held-out (unseen) task marked."""
    from tl_taskmap.report.layer_map import build_layer_map, read_layer_map
    from tl_taskmap.neurons.masked_training import train_control_model
    from tl_taskmap.neurons.multitask import multitask_model

    selection, evaluation = suites
    settings = dict(steps=40, lr=1e-3, batch_size=8, seed=0, progress=False)
    mt = multitask_model(base, selection, cache_dir=tmp_path, held_out=["first_letter"], **{**settings, "steps": 120})
    controls = {t.name: train_control_model(base, t, **settings) for t in selection}
    meta = build_layer_map(base, selection, evaluation, controls, folder=tmp_path / "layers", multitask=mt,
                           control_settings=settings, n_boot=200, seed=0)
    assert meta["pair"] == "multitask" and meta["held_out"] == ["first_letter"]
    loaded = read_layer_map(tmp_path / "layers")
    assert set(loaded["tables"]) == {"task_vs_null", "pair", "null_pair", "pair_vs_null", "multitask_scores"}
    scores = loaded["tables"]["multitask_scores"].set_index("task")
    assert scores.loc["last_letter", "multitask"] >= 0.85 and scores.loc["last_letter", "gain"] > 0.2, scores
    assert bool(scores.loc["first_letter", "unseen"])
    pair = loaded["tables"]["pair"]
    assert pair.groupby("task")["unseen"].first().to_dict() == {"last_letter": False, "first_letter": True}
    assert (pair["low"] <= pair["diff"]).all() and (pair["diff"] <= pair["high"]).all()
    assert pair.shape[0] == 2 * 3 and loaded["tables"]["null_pair"].shape[0] == 2 * 3
    sections = loaded["sections"]
    assert "tuned - base <= 0.0" in sections["pair"]["rule"] and "rise >= 0.02" in sections["pair"]["rule"]  # thresholds printed
    assert sections["null_pair"] is not None and sections["pair_unseen"] is not None
    assert "Bonferroni" in loaded["rules"]["pair_vs_null"]
    # Independent check of one number: CKA(multi-task, control) at layer 0 for the seen task.
    from tl_taskmap.activations import capture
    from tl_taskmap.stats.cka import feature_space_linear_cka

    task = evaluation["last_letter"]
    x = capture(mt.model, task.prompts, sites=[(0, "resid_post")], progress=False)[(0, "resid_post")].double().numpy()
    y = capture(controls["last_letter"], task.prompts, sites=[(0, "resid_post")], progress=False)[(0, "resid_post")].double().numpy()
    row = pair[(pair["task"] == "last_letter") & (pair["layer"] == 0)].iloc[0]
    assert row["cka_a"] == pytest.approx(feature_space_linear_cka(x, y), abs=1e-9)
    (tmp_path / "meta.json").write_text(json.dumps(meta, default=str))  # JSON-able


@pytest.mark.slow
def test_report_uses_the_multitask_pair_and_guards_artefacts(tmp_path):
    """map_model with multitask='train' on a tiny model: the page names sections only for the pair, prints the
    rule and the 'how this differs' box; with 2 tasks the centred cosine is left out with its reason; capped
    dims are not drawn as a trend."""
    from tests.test_report import tiny_config, write_tasks
    from tl_taskmap.report import map_model

    config = tiny_config(tmp_path / "out", write_tasks(tmp_path / "tasks"), multitask="train", multitask_steps=2,
                         multitask_cache=str(tmp_path / "cache"), layer_map_boot=100)
    result = map_model(config, progress=False, log=lambda message: None)
    page = result.html.read_text()
    assert "How this differs from the paper" in page and "Base vs tuned" in page
    sections = json.loads((result.out / "layers" / "layer_map.json").read_text())["sections"]
    assert ("Sections with task controls" in page) == bool(sections.get("pair"))  # named only when the rule finds them
    assert "Task control vs null control" in page and "Gains that survive the null" in page
    assert "task_similarity" not in result.figures
    assert any("Cosine of centred task means: needs ≥ 3 tasks" in n for n in result.left_out)
    assert "every task and layer sits at the cap" in page or "at the cap min(n − 1, d)" in page
    assert (result.out / "layers" / "pair.csv").is_file() and (tmp_path / "cache" / "multitask").is_dir()
    record = json.loads((result.out / "stages" / "layers.json").read_text())
    assert record["layer_map_pair"] == "multitask"
    # One model, no pair: no section names, the unchanged layers instead.
    single = map_model(tiny_config(tmp_path / "single", write_tasks(tmp_path / "tasks2"), multitask="off", layer_map_boot=100),
                       progress=False, log=lambda message: None)
    text = single.html.read_text()
    assert "Layers fine-tuning leaves unchanged" in text and "Sections with" not in text and "Sections (model" not in text
    assert "Layer sections" not in text.split("id='findings'")[1].split("</ul>")[0]
    pd.read_csv(single.out / "layers" / "task_vs_null.csv")
