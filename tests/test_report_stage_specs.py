"""The pipeline's stages as data: their order and exactly what each stage's hash depends on."""

from __future__ import annotations

import pytest

from tl_taskmap.report.pipeline import STAGES, MapConfig, _StageContext
from tl_taskmap.report.stages import StageSpec, check_stage_order


def test_stages_run_in_dependency_order():
    check_stage_order(STAGES)
    assert [s.name for s in STAGES] == ["baseline", "relevance", "neurons", "layers", "ablation", "heads", "selection"]
    with pytest.raises(ValueError, match="'neurons' depends on 'relevance'"):
        check_stage_order([s for s in STAGES if s.name != "relevance"])


def test_heads_stage_is_enabled_by_the_config():
    heads = next(s for s in STAGES if s.name == "heads")
    assert heads.enabled(MapConfig(heads=True)) and not heads.enabled(MapConfig(heads=False))


def test_stage_hash_inputs_are_the_declared_ones():
    """The inputs (and so the hashes) of the records written before stages were declared as data: reuse stays exact."""
    config = MapConfig(multitask="off", k=0.05)
    model, tasks = {"model": "m", "dtype": config.dtype}, {"selection": "s", "evaluation": "e"}
    stages: dict = {}
    context = _StageContext(None, config, stages)  # type: ignore[arg-type]
    inputs = {}
    for spec in STAGES:
        inputs[spec.name] = spec.inputs(config, model=model, tasks=tasks, upstream=stages, context=context)
        stages[spec.name] = {"hash": f"h-{spec.name}"}
    assert inputs["baseline"] == {**model, "second_model": None, **tasks, "tests": 2}
    assert inputs["relevance"] == {**model, **tasks}
    assert inputs["neurons"] == {"relevance": "h-relevance", "k": 0.05, "per_layer": config.per_layer}
    assert inputs["layers"] == {**model, **tasks, **config.parts(
        "sites", "reduce", "train_controls", "control_steps", "control_lr", "control_neurons", "seed", "null_controls",
        "layer_map_boot", "multitask", "multitask_steps", "multitask_lr", "multitask_held_out"),
        "second_model": None, "control_models": {}, "multitask_cached": False,
        "neurons": "h-neurons" if config.control_neurons == "task" else None}
    assert inputs["ablation"] == {"neurons": "h-neurons", **model, **tasks, **config.parts("seeds", "ablation_mode", "seed"), "tests": 2}
    assert inputs["heads"] == {**model, **tasks, **config.parts("k", "per_layer", "seeds", "ablation_mode", "seed")}
    assert inputs["selection"] == {"relevance": "h-relevance", "ablation": "h-ablation", **model, **tasks,
                                   **config.parts("selection", "k", "per_layer", "seeds", "ablation_mode", "seed")}


def test_a_stage_spec_lists_upstream_hashes_then_fields_then_extras():
    spec = StageSpec("s", compute=lambda run: ([], {}), fields=("k",), after=("a",), constants={"v": 1},
                     extra=lambda ctx: {"k": "overridden", "x": ctx})
    assert spec.inputs(MapConfig(), model={"model": "m"}, tasks={}, upstream={"a": {"hash": "h"}}, context=3) == {
        "a": "h", "model": "m", "k": "overridden", "v": 1, "x": 3}
