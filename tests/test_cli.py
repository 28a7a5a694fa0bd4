"""The ``tl-taskmap`` command: complete help, and bad options fail before any model is loaded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tl_taskmap import cli, embedded
from tl_taskmap.report.config import ConfigError, MapConfig


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every model loader raises: a test using this proves the command never reached a model."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded")

    for name in ("load_default_model", "load_model", "prepare_default_model"):
        monkeypatch.setattr(embedded, name, refuse)
    return calls


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["map", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # every MapConfig field has an option (per_layer is --global-top-k)
    for field in MapConfig.__dataclass_fields__:
        option = {"per_layer": "--global-top-k", "control_models": "--control-model", "heads": "--no-heads"}.get(field, "--" + field.replace("_", "-"))
        assert option in text, f"--help does not mention {option} (MapConfig.{field})"
    for word in ("--dry-run", "--force", "--threads", "Examples:"):
        assert word in text


def test_top_level_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "map" in capsys.readouterr().out
    assert cli.main([]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "k must be in (0, 1]"),
        (["--k", "1.5"], "k must be in (0, 1]"),
        (["--k", "150%"], "k must be in (0, 1]"),
        (["--seeds", "0"], "seeds must be an integer ≥ 1"),
        (["--examples", "3"], "examples must be an integer ≥ 8"),
        (["--batch-size", "0"], "batch_size"),
        (["--device", "gpu"], "device 'gpu'"),
        (["--device", "cuda:7"], "cuda"),
        (["--sites", "resid_postt"], "unknown site 'resid_postt'"),
        (["--model", "./no/such/folder"], "no such folder"),
        (["--second-model", "/no/such/model"], "no such folder"),
        (["--tasks", "/no/such/file.jsonl"], "does not exist"),
        (["--control-model", "sst2=/no/such/control"], "not a saved control model"),
        (["--control-lr", "-1"], "control_lr must be positive"),
    ],
)
def test_bad_options_fail_before_any_model(argv, message, capsys, no_model_loading, tmp_path):
    assert cli.main(["map", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert no_model_loading == []
    assert not (tmp_path / "r").exists()  # nothing written either


@pytest.mark.parametrize("argv", [["--dtype", "float64"], ["--reduce", "max"], ["--ablation-mode", "drop"],
                                  ["--seeds", "two"], ["--k", "ten"], ["--control-model", "no-equals-sign"],
                                  ["--threads", "0"], ["--control-neurons", "some"]])
def test_bad_values_are_rejected_by_the_parser(argv, no_model_loading, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["map", *argv])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
    assert no_model_loading == []


def test_task_file_problems_fail_before_any_model(tmp_path, capsys, no_model_loading):
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"review {i}", "label": i % 2}) for i in range(12)))
    # a template naming a column the file does not have
    argv = ["map", "--out", str(tmp_path / "r"), "--tasks", str(data), str(data), "--template", "Review: {body}\\nSentiment:",
            "--target-template", "{label}", "--options", " negative", " positive"]
    assert cli.main(argv) == 2
    assert "body" in capsys.readouterr().err
    assert no_model_loading == []


def test_dry_run_reads_tasks_from_files_and_loads_no_model(tmp_path, capsys, no_model_loading):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": f"{name} {i}", "label": i % 2}) for i in range(12)))
    argv = ["map", "--out", str(tmp_path / "r"), "--tasks", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
            "--template", "Review: {text}\\nSentiment:", "--target-template", "{label}", "--options", " negative", " positive",
            "--examples", "10", "--k", "5%", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    config = json.loads(out[: out.index("\ntask ") + 1])
    assert config["k"] == 0.05 and config["template"] == "Review: {text}\nSentiment:" and config["options"] == [" negative", " positive"]
    assert "task 'a' (misc, accuracy): 5 selection + 5 evaluation examples" in out
    assert no_model_loading == []


def test_config_file_round_trip_and_override(tmp_path):
    saved = tmp_path / "config.json"
    MapConfig(out=str(tmp_path / "r"), k=0.2, seeds=3, sites=["resid_post", "mlp_out"]).save(saved)
    args = cli.build_parser().parse_args(["map", "--config", str(saved), "--seeds", "4"])
    config = cli.config_from_args(args)
    assert (config.k, config.seeds, config.sites) == (0.2, 4, ["resid_post", "mlp_out"])
    saved.write_text(json.dumps({"k": 0.1, "colour": "red"}))
    with pytest.raises(ConfigError, match="unknown configuration keys \\['colour'\\]"):
        cli.config_from_args(cli.build_parser().parse_args(["map", "--config", str(saved)]))


def test_python_dash_m_and_console_script_entry(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tl_taskmap", "map", "--k", "2"], capture_output=True, text=True, timeout=1800)  # hang guard
    assert done.returncode == 2 and "k must be in (0, 1]" in done.stderr
    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    assert 'tl-taskmap = "tl_taskmap.cli:main"' in text
