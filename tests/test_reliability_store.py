"""Issue #16 units without a model: the stage store's integrity rules, the lock, file names, model fingerprints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tl_taskmap import embedded
from tl_taskmap.file_names import MAX_NAME_CHARS, check_file_names, safe_name
from tl_taskmap.report.stages import RECORD_VERSION, OutLock, OutLockedError, StageStore


def compute_into(root: dict, value: str):
    """A stage that writes a file and a folder under the current write root, like the report's stages."""
    def compute():
        folder = root["write"]
        (folder / "table.csv").write_text(value)
        (folder / "stats").mkdir(exist_ok=True)
        (folder / "stats" / "part.json").write_text(json.dumps({"value": value}))
        return ["table.csv", "stats"], {}
    return compute


@pytest.fixture
def store(tmp_path):
    root = {"write": tmp_path}

    class Redirect:
        def __init__(self, folder):
            self.folder = folder

        def __enter__(self):
            root["saved"], root["write"] = root["write"], self.folder

        def __exit__(self, *exc):
            root["write"] = root["saved"]

    return StageStore(tmp_path, stage_into=Redirect), root, tmp_path


def test_a_stage_is_reused_only_while_its_files_match_their_sha256(store):
    store, root, out = store
    logs = []
    first = store.run("s", {"x": 1}, compute_into(root, "one"), logs.append)
    assert not first["cached"] and set(first["sha256"]) == {"table.csv", "stats/part.json"}
    assert (out / "table.csv").read_text() == "one" and not list((out / "stages" / ".staging").iterdir())
    assert store.run("s", {"x": 1}, compute_into(root, "two"), logs.append)["cached"]
    (out / "stats" / "part.json").write_text("{}")  # changed by hand
    again = store.run("s", {"x": 1}, compute_into(root, "two"), logs.append)
    assert not again["cached"] and "stats/part.json does not match the sha256" in logs[-2]
    assert (out / "table.csv").read_text() == "two"


def test_other_inputs_recompute_and_replace_a_listed_folder_whole(store):
    store, root, out = store
    store.run("s", {"x": 1}, compute_into(root, "one"), lambda m: None)
    (out / "stats" / "stale.json").write_text("{}")  # a file of an older run inside the stage's folder
    store.run("s", {"x": 2}, compute_into(root, "two"), lambda m: None)
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["part.json"]


def test_a_record_without_sha256_is_recomputed_and_said_so(store):
    store, root, out = store
    store.run("s", {"x": 1}, compute_into(root, "one"), lambda m: None)
    record = json.loads((out / "stages" / "s.json").read_text())
    del record["sha256"]
    record["format_version"] = 1
    (out / "stages" / "s.json").write_text(json.dumps(record))
    logs = []
    assert not store.run("s", {"x": 1}, compute_into(root, "one"), logs.append)["cached"]
    assert f"expected version {RECORD_VERSION}" in logs[0]


def test_a_failing_stage_leaves_the_old_stage_intact(store):
    store, root, out = store
    store.run("s", {"x": 1}, compute_into(root, "one"), lambda m: None)

    def half_then_fail():
        (root["write"] / "table.csv").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.run("s", {"x": 2}, half_then_fail, lambda m: None)
    assert (out / "table.csv").read_text() == "one"
    assert store.run("s", {"x": 1}, compute_into(root, "one"), lambda m: None)["cached"]


def test_the_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with OutLock(tmp_path):
        with pytest.raises(OutLockedError, match=r"is in use by pid \d+"):
            with OutLock(tmp_path):
                pass
    with OutLock(tmp_path):  # released on exit
        pass


NAMES = ["a b", "a_b", "a/b", "///", "???", "x" * 300, "x" * 301, ".", "..", "", "Ω", "ω", "arithmetic/1_digit_addition", "sentiment"]


def test_file_names_are_injective_bounded_and_portable():
    names = [safe_name(n) for n in NAMES]
    assert len(set(names)) == len(NAMES)
    assert all(len(n) <= MAX_NAME_CHARS and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", n) for n in names)
    assert safe_name("sentiment") == "sentiment"  # plain names stay as they are
    check_file_names(NAMES)
    with pytest.raises(ValueError, match="would share the file name"):
        check_file_names(["Past", "past"])


def test_model_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    assert embedded.model_fingerprint(a) == embedded.model_fingerprint(b)  # a moved copy is the same model
    (b / "model.safetensors").write_bytes(b"retrained")
    assert embedded.model_fingerprint(a) != embedded.model_fingerprint(b)
    assert embedded.model_fingerprint("org/model") == {"hub": "org/model"}
