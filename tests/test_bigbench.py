"""BIG-bench JSON loader on small task files written here (a folder, a file, and a .tar.gz like the sdist)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tl_taskmap import bigbench
from tl_taskmap.bigbench import BigBenchFormatError, extract_bigbench_tasks, load_bigbench_task, load_bigbench_tasks

CHOICE = {
    "name": "toy_choice",
    "keywords": ["arithmetic", "multiple choice"],
    "task_prefix": "Add the numbers.\n",
    "example_input_prefix": "\nQuestion: ",
    "example_output_prefix": "\nAnswer: ",
    "examples": [
        {"input": "What is 1 plus 1?", "target_scores": {"2": 1, "3": 0, "banana": 0}},
        {"input": "What is 2 plus 2?", "target_scores": {"5": 0, "4": 1, "house": 0}},
        {"input": "What is 3 plus 0?", "target_scores": {"3": 1.0, "0": 0.0}},
        {"input": "What is 1 plus 2?", "target_scores": {"3": 0.9, "4": 0.1}},
    ],
}
GENERATION = {
    "name": "toy_generation",
    "keywords": ["morphology"],
    "examples": [
        {"input": "cat", "target": "cats"},
        {"input": "child", "target": ["children", "childs"]},
        {"input": "mouse", "target": "mice", "target_scores": {"mice": 1, "mouses": 0}},
    ],
}


def write_task(folder: Path, name: str, data: dict) -> Path:
    path = folder / name / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def make_archive(path: Path, tasks: dict[str, dict]) -> Path:
    """A .tar.gz laid out like the bigbench sdist, with some unrelated members."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add("bigbench-1.0.0/setup.py", b"print('not run')\n")
        for name, data in tasks.items():
            add(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json", json.dumps(data).encode())
            add(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/README.md", b"readme")
    return path


def test_multiple_choice_options_and_target(tmp_path):
    task = load_bigbench_task(write_task(tmp_path, "toy_choice", CHOICE))
    assert task.metric == "accuracy" and len(task) == 4
    first = task.examples[0]
    assert first.prompt == "Q: What is 1 plus 1?\nA:"
    assert first.options == (" 2", " 3", " banana") and first.target == " 2"
    assert task.examples[1].target == " 4"
    assert task.examples[3].target == " 3"  # the highest score wins, not only score 1
    assert task.cluster == "arithmetic"
    assert task.meta["template"] == bigbench.QA_TEMPLATE and task.meta["source"] == "bigbench"
    assert task.meta["chat_template"] is False


def test_generation_uses_target_or_first_of_list(tmp_path):
    task = load_bigbench_task(write_task(tmp_path, "toy_generation", GENERATION), cluster="morphology")
    assert task.metric == "exact_match"
    assert task.targets == [" cats", " children", " mice"]
    assert all(e.options is None for e in task.examples)


def test_generation_mode_from_a_choice_task(tmp_path):
    task = load_bigbench_task(write_task(tmp_path, "toy_choice", CHOICE), mode="generation")
    assert task.metric == "exact_match" and task.targets[:2] == [" 2", " 4"]


def test_native_template_and_answer_prefix(tmp_path):
    path = write_task(tmp_path, "toy_choice", CHOICE)
    task = load_bigbench_task(path, template=bigbench.NATIVE_TEMPLATE)
    assert task.examples[0].prompt == "Add the numbers.\n\nQuestion: What is 1 plus 1?\nAnswer:"
    assert task.examples[0].target == " 2"
    after_newline = load_bigbench_task(path, template="{input}\n")
    assert after_newline.examples[0].target == "2" and after_newline.examples[0].prompt.endswith("?\n")
    with_options = load_bigbench_task(path, template="{input} Options: {options}.", answer_prefix=" =>")
    assert with_options.examples[0].prompt == "What is 1 plus 1? Options: 2, 3, banana."
    assert with_options.examples[0].target == " =>2"
    assert with_options.meta["template"] == "{input} Options: {options}."


def test_ties_are_skipped_and_counted(tmp_path):
    data = {"examples": CHOICE["examples"] + [{"input": "Pick one", "target_scores": {"a": 1, "b": 1}}]}
    task = load_bigbench_task(write_task(tmp_path, "ties", data))
    assert len(task) == 4 and task.meta["n_skipped_ambiguous"] == 1


def test_max_examples_is_a_seeded_sample(tmp_path):
    path = write_task(tmp_path, "toy_choice", CHOICE)
    a = load_bigbench_task(path, max_examples=2, seed=3)
    b = load_bigbench_task(path, max_examples=2, seed=3)
    assert len(a) == 2 and a.prompts == b.prompts


@pytest.mark.parametrize(
    "data, message",
    [
        ({"examples": []}, "has no examples"),
        ({"name": "x"}, "has no examples"),
        ({"examples": [{"input": "a", "target_scores": {"x": 1}}, {"input": "b"}]}, "neither 'target_scores' nor 'target'"),
        ({"examples": [{"input": "a", "target": ""}]}, "neither 'target_scores' nor 'target'"),
        ({"examples": [{"target": "x"}]}, "no string 'input'"),
        ({"examples": [{"input": "a", "target_scores": {"x": 1, "y": 1}}]}, "several top-scoring options"),
    ],
)
def test_bad_task_files_give_clear_errors(tmp_path, data, message):
    with pytest.raises(BigBenchFormatError, match=message):
        load_bigbench_task(write_task(tmp_path, "bad", data))


def test_invalid_json(tmp_path):
    path = tmp_path / "broken" / "task.json"
    path.parent.mkdir()
    path.write_text("{oops")
    with pytest.raises(BigBenchFormatError, match="not valid JSON"):
        load_bigbench_task(path)


@pytest.mark.parametrize(
    "template, message",
    [("Question: {question}\nA:", r"no \{input\} placeholder"), ("{input} {colour}", "unknown fields"), ("{input", "not a valid format")],
)
def test_template_errors(tmp_path, template, message):
    with pytest.raises(BigBenchFormatError, match=message):
        load_bigbench_task(write_task(tmp_path, "toy_choice", CHOICE), template=template)


def test_load_by_name_from_folder_and_archive(tmp_path):
    folder = tmp_path / "benchmark_tasks"
    write_task(folder, "arith/toy_choice", CHOICE)
    from_folder = load_bigbench_task("arith/toy_choice", archive=folder)
    assert from_folder.name == "arith/toy_choice" and len(from_folder) == 4

    archive = make_archive(tmp_path / "bigbench-1.0.0.tar.gz", {"arith/toy_choice": CHOICE, "toy_generation": GENERATION})
    from_archive = load_bigbench_task("arith/toy_choice", archive=archive)
    assert from_archive.prompts == from_folder.prompts
    assert from_archive.meta["bigbench_task"] == "arith/toy_choice"
    with pytest.raises(FileNotFoundError, match="no BIG-bench task 'nope'"):
        load_bigbench_task("nope", archive=archive)


def test_extract_only_the_named_tasks(tmp_path):
    archive = make_archive(tmp_path / "bigbench-1.0.0.tar.gz", {"arith/toy_choice": CHOICE, "toy_generation": GENERATION, "other": CHOICE})
    dest = tmp_path / "tasks"
    paths = extract_bigbench_tasks(["toy_generation", "arith/toy_choice"], archive, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["arith/toy_choice/task.json", "toy_generation/task.json"]
    assert json.loads(paths["toy_generation"].read_text()) == GENERATION
    paths["toy_generation"].write_text(json.dumps(CHOICE))  # existing files are kept (no re-extraction)
    extract_bigbench_tasks(["toy_generation"], archive, dest)
    assert json.loads(paths["toy_generation"].read_text()) == CHOICE
    with pytest.raises(FileNotFoundError, match=r"\['missing'\]"):
        extract_bigbench_tasks(["missing"], archive, dest)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: bigbench==1.0.0"):
        extract_bigbench_tasks(["other"], tmp_path / "absent.tar.gz", dest)
    assert bigbench.list_archive_tasks(archive) == ["arith/toy_choice", "other", "toy_generation"]


def test_load_several_from_archive(tmp_path):
    archive = make_archive(tmp_path / "bigbench-1.0.0.tar.gz", {"arith/toy_choice": CHOICE, "toy_generation": GENERATION})
    tasks = load_bigbench_tasks(["arith/toy_choice", "toy_generation"], archive=archive, dest=tmp_path / "x", max_examples=2)
    assert [t.name for t in tasks] == ["arith/toy_choice", "toy_generation"]
    assert [len(t) for t in tasks] == [2, 2]
    assert tasks[0].meta["bigbench_task"] == "arith/toy_choice"


def test_default_locations_follow_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TL_TASKMAP_CACHE", str(tmp_path))
    assert bigbench.default_archive() == tmp_path / "bigbench" / "bigbench-1.0.0.tar.gz"
    write_task(bigbench.extracted_dir(), "arith/toy_choice", CHOICE)
    task = load_bigbench_task("arith/toy_choice")
    assert task.meta["bigbench_task"] == "arith/toy_choice" and len(task) == 4
