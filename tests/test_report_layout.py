"""The report folder's layout: every path the pipeline writes and the readers read, spelled once."""

from __future__ import annotations

from pathlib import Path

from tl_taskmap.report.layout import ABLATION_FILES, ReportLayout


def test_layout_names_the_documented_files():
    layout = ReportLayout("out")
    rel = layout.rel
    assert [rel(p) for p in (layout.html, layout.config, layout.baseline, layout.baseline_examples, layout.relevance_by_layer,
                             layout.current_config, layout.lock, layout.figure("baseline"), layout.selection)] == [
        "report.html", "config.json", "baseline.csv", "baseline_examples.json", "relevance_by_layer.csv",
        "stages/current_config.json", "stages/.lock", "figures/baseline.png", "selection"]
    assert rel(layout.relevance("a")) == "relevance/a.safetensors" and rel(layout.neuron_set("a")) == "neurons/a.json"
    assert rel(layout.neuron_table("jaccard.csv")) == "neurons/jaccard.csv"
    assert [rel(p) for p in layout.ablation.files] == [f"ablation/{f}" for f in ABLATION_FILES]
    assert [rel(p) for p in layout.heads.ablation.files] == [f"heads/ablation/{f}" for f in ABLATION_FILES]
    assert rel(layout.heads.relevance("a")) == "heads/relevance/a.safetensors" and rel(layout.heads.head_set("a")) == "heads/sets/a.json"
    layers = layout.layers
    assert [rel(p) for p in (layers.stats, layers.stats_csv, layers.controls, layers.layer_map, layers.null_controls, layers.table("pair"))] == [
        "layers/stats", "layers/layer_stats.csv", "layers/controls.json", "layers/layer_map.json", "layers/null_controls.json",
        "layers/pair.csv"]
    assert rel(layout.stage_record("neurons")) == "stages/neurons.json" and rel(layout.staging("neurons")) == "stages/.staging/neurons"
    assert rel(layout.control_model("a")) == "controls/a"


def test_task_names_become_safe_file_names():
    layout = ReportLayout(Path("out"))
    assert "/" not in layout.rel(layout.neuron_set("a/b")).removeprefix("neurons/")
    assert layout.neuron_set("a/b") != layout.neuron_set("a_b")


def test_layout_is_a_value():
    assert ReportLayout("out") == ReportLayout(Path("out")) and hash(ReportLayout("out")) == hash(ReportLayout("out"))
