"""The report's heads stage on a tiny model: files, finite numbers, the HTML section and its figures,
reuse on re-run, skipping with heads=False, and a model without attn.hook_z recorded as skipped."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from tests.test_report import tiny_config, write_tasks
from tl_taskmap.neurons.head_attribution import HeadRelevanceScores
from tl_taskmap.neurons.sets import HeadSet
from tl_taskmap.report import MapConfig, map_model

HEAD_FIGURES = {"head_relevance", "relevance_neurons_vs_heads", "head_overlap", "head_ablation_matrix", "head_specificity"}


@pytest.fixture(scope="module")
def heads_report(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("heads_report")
    config = tiny_config(root / "out", write_tasks(root / "tasks"), train_controls=0)
    return map_model(config, progress=False, log=lambda message: None)


@pytest.mark.slow
def test_heads_stage_writes_files_and_section(heads_report):
    out = heads_report.out / "heads"
    record = json.loads((heads_report.out / "stages" / "heads.json").read_text())
    assert record["files"] and record["n_heads"] == {"sentiment": 3, "arith": 3}  # 10% of 4 heads -> 1 per layer, 3 layers
    assert record["layout"] == {"n_heads": 4, "d_head": 8, "n_key_value_heads": 2}
    from tl_taskmap.report_config import load_suite

    selection, _ = load_suite(heads_report.config)  # repeated prompts stay in one half: halves need not be equal
    for task in ("sentiment", "arith"):
        rel = HeadRelevanceScores.load(out / "relevance" / f"{task}.safetensors")
        assert rel.scores.shape == (3, 4) and rel.n_examples == len(selection[task])
        assert HeadSet.load(out / "sets" / f"{task}.json") == rel.top(0.1)
    by_head = pd.read_csv(out / "relevance_by_head.csv")
    assert by_head.groupby("task")["share"].sum().round(9).eq(1).all()
    by_layer = pd.read_csv(out / "relevance_by_layer.csv")
    assert by_layer.groupby("task")["relevance_share"].sum().round(9).eq(1).all()
    overlap = pd.read_csv(out / "overlap_vs_random.csv")
    assert len(overlap) == 1 and 0 <= overlap.random_low[0] <= overlap.random_mean[0] <= overlap.random_high[0] <= 1
    spec = pd.read_csv(out / "ablation" / "specificity.csv")
    assert all(math.isfinite(v) for v in spec["vs_random"]) and json.loads((out / "ablation" / "matrix.json").read_text())["meta"]["unit"] == "head"
    assert HEAD_FIGURES <= set(heads_report.figures)
    text = heads_report.html.read_text(encoding="utf-8")
    assert "id='heads'" in text and "href='#heads'" in text and "grouped-query attention" in text and "could not be drawn" not in text


@pytest.mark.slow
def test_heads_false_skips_the_stage_and_section(heads_report, tmp_path, one_thread):
    out = tmp_path / "copy"
    shutil.copytree(heads_report.out, out)
    config = MapConfig.from_dict({**heads_report.config.to_dict(), "out": str(out), "heads": False})
    result = map_model(config, progress=False, log=lambda message: None)
    assert "heads" not in result.stages and all(r["cached"] for r in result.stages.values())
    assert not HEAD_FIGURES & set(result.figures)
    assert "id='heads'" not in result.html.read_text(encoding="utf-8")
    again = map_model(heads_report.config, progress=False, log=lambda message: None)
    assert again.stages["heads"]["cached"]


def test_config_and_cli_flag():
    from tl_taskmap.cli import build_parser, config_from_args
    from tl_taskmap.report_config import ConfigError

    assert MapConfig().heads is True
    with pytest.raises(ConfigError, match="heads must be true or false"):
        MapConfig(heads="yes").validate()
    args = build_parser().parse_args(["map", "--no-heads"])
    assert config_from_args(args).heads is False


def test_model_without_hook_z_is_recorded_as_skipped(monkeypatch):
    from types import SimpleNamespace

    from tl_taskmap import report_heads
    from tl_taskmap.models import UnsupportedModelError
    from tl_taskmap.neurons import heads as heads_module

    def no_heads(model):
        raise UnsupportedModelError("the model has no per-head attention output hook 'blocks.0.attn.hook_z'")

    monkeypatch.setattr(heads_module, "head_layout", no_heads)
    files, record = report_heads.heads_stage(SimpleNamespace(model=object(), config=MapConfig()))
    assert files == [] and "hook_z" in record["skipped"]
