"""Task specs (YAML / JSON) mixing built-in and own tasks, one-task maps end to end, and the ``tasks`` command.

Built-in tasks come from a toy asset cache (a BIG-bench-shaped archive and a VADER wheel in a temporary
``TL_TASKMAP_CACHE``), so nothing here needs the real assets.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests import tiny_models
from tests.test_bigbench import CHOICE, make_archive
from tl_taskmap import suite as suite_module
from tl_taskmap.cli import main
from tl_taskmap.report import MapConfig, map_model
from tl_taskmap.report.config import ConfigError, load_suite
from tl_taskmap.suite import TaskSpec
from tl_taskmap.task_spec import Defaults, TaskEntry, TaskSpecError, builtin_table, load_entries, parse_entry, read_spec, row_notes

OWN_TEMPLATE = "Text: {text}\nAnswer:"
LEXICON = {**{w: 2.5 for w in "good great superb happy lovely joyful kind brave".split()},
           **{w: -2.5 for w in "awful horrible terrible sad nasty cruel vile grim".split()}}


@pytest.fixture
def toy_builtins(tmp_path, monkeypatch):
    """Two built-in tasks (a BIG-bench choice task with 20 usable examples and a 16-word VADER task) in a private cache."""
    cache = tmp_path / "cache"
    (cache / "bigbench").mkdir(parents=True)
    many = [{**e, "input": f"{e['input']} ({i})"} for i in range(5) for e in CHOICE["examples"]]
    make_archive(cache / "bigbench" / "bigbench-1.0.0.tar.gz", {"arith/toy_choice": {**CHOICE, "examples": many}})
    (cache / "lexicons").mkdir()
    with zipfile.ZipFile(cache / "lexicons" / "vaderSentiment-3.3.2-py2.py3-none-any.whl", "w") as zf:
        zf.writestr("vaderSentiment/vader_lexicon.txt", "".join(f"{w}\t{v}\t0.5\t[]\n" for w, v in LEXICON.items()))
    specs = (TaskSpec("toy_choice", "arithmetic", "bigbench", "arith/toy_choice", zero_shot=0.9, chance=0.4),
             TaskSpec("word_sentiment", "sentiment", "vader", "vader_lexicon", zero_shot=0.95, chance=0.5))
    monkeypatch.setattr(suite_module, "DEFAULT_TASKS", specs)
    monkeypatch.setenv("TL_TASKMAP_CACHE", str(cache))
    return cache


def write_own_task(folder: Path, n: int = 12, name: str = "topics.jsonl") -> Path:
    """An own jsonl task whose columns (text, label, choices) differ from the built-in tasks' and the CLI defaults."""
    folder.mkdir(parents=True, exist_ok=True)
    topics = [" sport", " food", " music"]
    words = {" sport": "goal match team", " food": "bread soup cake", " music": "song drum choir"}
    rows = [{"text": f"{words[topics[i % 3]].split()[i % 3]} number {i}", "label": i % 3, "choices": topics} for i in range(n)]
    path = folder / name
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def write_mixed_spec(folder: Path, suffix: str = ".yaml") -> Path:
    write_own_task(folder / "data")
    entries = [{"builtin": "toy_choice"}, "word_sentiment",
               {"name": "topics", "file": "data/topics.jsonl", "template": OWN_TEMPLATE, "target_template": "{label}",
                "options_field": "choices", "cluster": "topic", "metric": "accuracy"}]
    path = folder / f"tasks{suffix}"
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump({"tasks": entries}))
    else:
        path.write_text(json.dumps({"tasks": entries}))
    return path


# ---------------------------------------------------------------------------------------- parsing
def test_entries_parse_and_errors_name_the_fix(tmp_path, toy_builtins):
    assert parse_entry("word_sentiment") == TaskEntry("builtin", "word_sentiment")
    assert parse_entry("hf:glue/sst2") == TaskEntry("hf", "glue/sst2")
    assert parse_entry("bigbench:arith/toy_choice") == TaskEntry("bigbench", "arith/toy_choice")
    assert parse_entry({"file": "x.jsonl"}, base=tmp_path).ref == str(tmp_path / "x.jsonl")
    with pytest.raises(TaskSpecError, match="exactly one source"):
        parse_entry({"file": "a.jsonl", "builtin": "word_sentiment"})
    with pytest.raises(TaskSpecError, match=r"unknown keys \['tempalte'\]"):
        parse_entry({"file": "a.jsonl", "tempalte": "{x}"})
    with pytest.raises(TaskSpecError, match="metric must be one of"):
        parse_entry({"file": "a.jsonl", "metric": "f1"})
    with pytest.raises(TaskSpecError, match="at least two strings"):
        parse_entry({"file": "a.jsonl", "options": [" yes"]})
    with pytest.raises(TaskSpecError, match=r"neither a file nor a built-in task; built-in tasks: \['toy_choice', 'word_sentiment'\]"):
        parse_entry("no_such_task")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: []\n")
    with pytest.raises(TaskSpecError, match="non-empty 'tasks' list"):
        read_spec(bad)
    bad.write_text("tasks: [{builtin: toy_choice}]\nextra: 1\n")
    with pytest.raises(TaskSpecError, match="unknown top-level keys"):
        read_spec(bad)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_spec_mixes_two_builtin_tasks_with_an_own_jsonl_task(tmp_path, toy_builtins, suffix):
    spec = write_mixed_spec(tmp_path, suffix)
    # The run-wide template / options are for other files: the own task's entry overrides them.
    config = MapConfig(out=str(tmp_path / "out"), tasks=[str(spec)], template="{input}", options=[" a", " b"], examples=8)
    selection, evaluation = load_suite(config.validate())
    assert selection.names == ["toy_choice", "word_sentiment", "topics"]
    assert [t.cluster for t in selection] == ["arithmetic", "sentiment", "topic"]
    own = selection["topics"]
    assert own.metric == "accuracy" and own.examples[0].options == (" sport", " food", " music")
    assert all(e.prompt.startswith("Text: ") and e.prompt.endswith("\nAnswer:") for e in own.examples + evaluation["topics"].examples)
    # each own row's answer is the label-th option of its own options column (independent re-derivation from the file)
    rows = {f"Text: {r['text']}\nAnswer:": r["choices"][r["label"]]
            for r in map(json.loads, (tmp_path / "data" / "topics.jsonl").read_text().splitlines())}
    assert all(rows[e.prompt] == e.target for e in own.examples)
    # the built-in tasks keep their own formats
    assert selection["word_sentiment"].examples[0].prompt.startswith("Word: ")
    assert selection["toy_choice"].examples[0].options is not None
    assert [len(s) + len(e) for s, e in zip(selection, evaluation)] == [8, 8, 8]


def test_task_names_and_tasks_mix_and_unknown_names_list_the_available(tmp_path, toy_builtins):
    own = write_own_task(tmp_path)
    config = MapConfig(out=str(tmp_path / "o"), task_names=["word_sentiment"], tasks=[str(own)], template=OWN_TEMPLATE,
                       target_template="{label}", options_field="choices", examples=8)
    selection, _ = load_suite(config.validate())
    assert selection.names == ["word_sentiment", "topics"]  # --task-names is not ignored when --tasks is given
    with pytest.raises(ConfigError, match=r"unknown built-in task names \['nope'\]; available: \['toy_choice', 'word_sentiment'\]"):
        load_suite(MapConfig(out=str(tmp_path / "o"), task_names=["nope"]))
    with pytest.raises(ConfigError, match="two tasks are named 'word_sentiment'"):
        load_suite(MapConfig(out=str(tmp_path / "o"), task_names=["word_sentiment"], tasks=["word_sentiment"]))


def test_examples_never_drops_rows_silently(tmp_path, toy_builtins, capsys):
    own = write_own_task(tmp_path, n=32)
    config = MapConfig(out=str(tmp_path / "o"), tasks=[str(own)], template=OWN_TEMPLATE, target_template="{label}",
                       options_field="choices", examples=24)
    selection, evaluation = load_suite(config.validate())
    assert len(selection[0]) + len(evaluation[0]) == 24
    assert row_notes(selection, evaluation, 24) == [
        "topics: 24 of its 32 rows are used (--examples 24, a seeded sample; raise --examples to use more)."]
    assert row_notes(*load_suite(MapConfig(out=str(tmp_path / "o"), tasks=[str(own)], template=OWN_TEMPLATE,
                                           target_template="{label}", options_field="choices", examples=32)), 32) == []
    code = main(["map", "--out", str(tmp_path / "o"), "--tasks", str(own), "--template", OWN_TEMPLATE, "--target-template", "{label}",
                 "--options-field", "choices", "--examples", "24", "--dry-run"])
    assert code == 0 and "note: topics: 24 of its 32 rows are used" in capsys.readouterr().out


def test_builtin_table_lists_cluster_metric_size_chance_and_zero_shot(toy_builtins, capsys):
    table = builtin_table()
    assert list(table["name"]) == ["toy_choice", "word_sentiment"]
    assert list(table["size"]) == [20, 16] and list(table["zero_shot"]) == [0.9, 0.95] and list(table["chance"]) == [0.4, 0.5]
    assert list(table["metric"]) == ["accuracy", "accuracy"] and list(table["cluster"]) == ["arithmetic", "sentiment"]
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "toy_choice" in out and "arithmetic" in out and "0.90" in out
    assert main(["tasks", "--json", "--no-sizes"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["toy_choice", "word_sentiment"]


def test_help_prints_no_doubled_percent(capsys):
    with pytest.raises(SystemExit):
        main(["map", "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "top-k%)" in out


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_one_own_task_maps_end_to_end(tmp_path):
    own = write_own_task(tmp_path, n=14)
    config = MapConfig(out=str(tmp_path / "out"), model=str(tiny_models.hf_folder("llama")), tasks=[str(own)], template=OWN_TEMPLATE,
                       target_template="{label}", options_field="choices", examples=12, seeds=2, train_controls=1, control_steps=2)
    messages: list[str] = []
    result = map_model(config, progress=False, log=messages.append)
    out = result.out
    assert not [m for m in messages if "could not" in m]
    assert "[tasks] topics: 12 of its 14 rows are used (--examples 12, a seeded sample; raise --examples to use more)." in messages
    assert all(not r["cached"] for r in result.stages.values())
    # relevance, neurons vs random sets, ablation vs random, layer map vs control: all present
    assert {"baseline", "relevance_by_layer", "specificity", "ablation_matrix", "cka_curves"} <= set(result.figures)
    # 6 evaluation examples: dims-for-99% sits at its cap min(n - 1, d), so it is marked, not drawn as a trend
    assert "dims_99" in result.figures or "at the cap min(n − 1, d)" in result.html.read_text()
    assert not {"jaccard", "overlap_sweep", "parameter_similarity", "task_similarity"} & set(result.figures)
    spec = pd.read_csv(out / "ablation" / "specificity.csv")
    assert list(spec["task"]) == ["topics"] and spec["vs_random"].notna().all()
    layers = pd.read_csv(out / "layers" / "layer_stats.csv")
    assert layers["model"].notna().all() and set(layers.loc[layers["statistic"] == "cka", "compared_with"]) == {"control"}
    assert pd.read_csv(out / "neurons" / "jaccard.csv").columns[0] == "task"
    page = result.html.read_text()
    assert "could not be drawn" not in page and "Figures that failed" not in page
    assert "This map has one task (topics)" in page and "12 of its 14 rows are used" in page
    assert any("one task" in n for n in result.left_out)
    # the page's run time and the console's agree
    stated = re.search(r"this run took (\d+) s before drawing this page", page).group(1)
    assert any(re.search(rf"report: .* \({stated} s as stated in the page \+ \d+ s drawing it", m) for m in messages), messages[-1]


@pytest.mark.slow
def test_mixed_spec_maps_end_to_end(tmp_path, toy_builtins):
    spec = write_mixed_spec(tmp_path)
    config = MapConfig(out=str(tmp_path / "out"), model=str(tiny_models.hf_folder("llama")), tasks=[str(spec)], examples=8, seeds=1,
                       train_controls=1, control_steps=1)
    result = map_model(config, progress=False, log=lambda m: None)
    baseline = result.baseline()
    assert list(baseline["task"]) == ["toy_choice", "word_sentiment", "topics"]
    assert set(result.figures) >= {"jaccard", "overlap_sweep", "ablation_matrix"}
    assert "Figures that failed" not in result.html.read_text()


def test_builtin_table_without_assets_leaves_sizes_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_TASKMAP_CACHE", str(tmp_path / "empty"))
    table = builtin_table()
    assert table["size"].isna().all() and table["zero_shot"].notna().all()
    assert list(table["name"]) == [s.name for s in suite_module.DEFAULT_TASKS]
