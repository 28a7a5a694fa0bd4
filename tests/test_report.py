"""End-to-end: the task-map pipeline on a tiny local model and two tiny tasks writes a complete,
self-contained report; a re-run reuses finished stages; the real default model runs through the CLI."""

import base64
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests import tiny_models
from tl_taskmap import embedded
from tl_taskmap.report import MapConfig, load_neuron_sets, map_model

# Two tasks of 4 evaluation examples: no centred-cosine panel (needs ≥ 3 tasks) and no t-SNE (too few points per task).
FIGURES = {"baseline", "cka_curves", "dims_99", "task_vs_null", "relevance_by_layer", "jaccard", "overlap_by_layer",
           "overlap_sweep", "parameter_similarity", "ablation_matrix", "specificity",
           "head_relevance", "relevance_neurons_vs_heads", "head_overlap", "head_ablation_matrix", "head_specificity",
           "selection_vs_other", "selection_vs_random"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_tasks(folder: Path) -> list[str]:
    """Two tiny tasks in the two file formats a user brings: a BIG-bench task.json and a jsonl file."""
    words = "the quick brown fox jumps over the lazy dog".split()
    bigbench = folder / "sentiment"
    bigbench.mkdir(parents=True)
    examples = [{"input": f"{words[i % 9]} {words[(3 * i) % 9]} movie {'great good' if i % 2 else 'bad awful'}",
                 "target_scores": {"positive": int(i % 2 == 1), "negative": int(i % 2 == 0)}} for i in range(12)]
    (bigbench / "task.json").write_text(json.dumps({"name": "sentiment", "keywords": ["sentiment"], "examples": examples}))
    rows = [{"input": f"{i % 5} + {(3 * i) % 5} =", "target": f" {(i % 5 + 3 * i % 5) % 3}", "options": [" 0", " 1", " 2"]}
            for i in range(12)]
    jsonl = folder / "arith.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    return [str(bigbench), str(jsonl)]


def tiny_config(out: Path, tasks: list[str], **overrides) -> MapConfig:
    settings = dict(out=str(out), model=str(tiny_models.hf_folder("llama")), tasks=tasks, template="{input}", options_field="options",
                    examples=12, seeds=2, train_controls=1, control_steps=2, batch_size=8)
    return MapConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def report(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("report")
    config = tiny_config(root / "out", write_tasks(root / "tasks"))
    return map_model(config, progress=False, log=lambda message: None)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


@pytest.mark.slow
def test_report_writes_every_file(report):
    out = report.out
    assert report.html == out / "report.html" and report.html.is_file()
    assert set(report.figures) == FIGURES, f"figures: {sorted(report.figures)}"
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    for name in ["config.json", "baseline.csv", "relevance_by_layer.csv", "neurons/jaccard.csv", "neurons/jaccard_per_layer.csv",
                 "neurons/overlap_sweep.csv", "neurons/parameter_similarity.csv", "neurons/sentiment.json", "neurons/arith.json",
                 "relevance/sentiment.safetensors", "relevance/arith.safetensors", "layers/stats/layer_stats.json",
                 "layers/stats/arrays.safetensors", "layers/layer_stats.csv", "layers/controls.json", "ablation/matrix.json",
                 "ablation/cells.csv", "ablation/delta_table.csv", "ablation/specificity.csv", "selection/comparison.csv",
                 "selection/summary.csv", "selection/comparison.json", "selection/matrix_exclusive.json"]:
        assert (out / name).is_file(), name
    assert MapConfig.load(out / "config.json") == report.config
    for stage in ("baseline", "relevance", "neurons", "layers", "ablation", "selection"):
        record = json.loads((out / "stages" / f"{stage}.json").read_text())
        assert record["seconds"] >= 0 and record["files"]


@pytest.mark.slow
def test_report_numbers_are_finite(report):
    def finite(values) -> bool:
        return all(math.isfinite(float(v)) for v in values)

    baseline = report.baseline()
    assert set(baseline["task"]) == {"sentiment", "arith"} and finite(baseline["metric_value"]) and finite(baseline["loss"])
    from tl_taskmap.report.config import load_suite

    _, evaluation = load_suite(report.config)  # 12 examples split in half, every copy of a repeated prompt in one half
    assert list(baseline["n"]) == [len(evaluation[t]) for t in baseline["task"]] and (baseline["n"] >= 4).all()
    stats = report.layer_stats()
    cka = stats.to_dataframe()
    assert {"model vs control"} <= set(cka["model_pair"].dropna()) and finite(cka["value"])
    assert list(stats.cka_by_task(("model", "control")).index) == ["sentiment"]  # one control model was trained
    relevance = pd.read_csv(report.out / "relevance_by_layer.csv")
    assert finite(relevance["relevance_share"])
    assert relevance.groupby("task")["relevance_share"].sum().round(6).eq(1).all()
    sets = report.neuron_sets()
    assert {n: len(s) for n, s in sets.items()} == {"sentiment": 3 * 5, "arith": 3 * 5}  # 10% of d_mlp=48 per layer
    for name in ("jaccard_per_layer.csv", "overlap_sweep.csv", "parameter_similarity.csv"):
        frame = pd.read_csv(report.out / "neurons" / name)
        assert finite(frame.iloc[:, -1]), name
    matrix = report.ablation()
    assert matrix.seeds == [0, 1] and set(matrix.set_names) == {"sentiment", "arith"}
    cells = pd.read_csv(report.out / "ablation" / "cells.csv")
    assert finite(cells["delta"]) and finite(cells["loss_delta"])
    spec = pd.read_csv(report.out / "ablation" / "specificity.csv")
    assert finite(spec["vs_random"]) and finite(spec["vs_other"])


@pytest.mark.slow
def test_html_is_self_contained_with_every_figure_embedded(report):
    text = report.html.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(link.startswith("#") for link in page.links), [x for x in page.links if not x.startswith("#")]
    assert "http://" not in text and "https://" not in text and "url(" not in text
    embedded_pngs = {}
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["src"][:40]
        embedded_pngs[img["alt"]] = base64.b64decode(img["src"][len(prefix):])
    assert set(embedded_pngs) == FIGURES
    for name, data in embedded_pngs.items():
        assert data == (report.out / "figures" / f"{name}.png").read_bytes(), name
    assert "could not be drawn" not in text
    for section in ("findings", "tasks", "layers", "neurons", "ablation", "selection", "left-out", "files", "config"):
        assert f"id='{section}'" in text
    assert "No base (pre-trained) model was compared" in text  # the left-out comparisons are said


@pytest.mark.slow
def test_rerun_reuses_stages_without_loading_a_model(report, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage loaded the model again")

    monkeypatch.setattr(embedded, "load_model", refuse)
    monkeypatch.setattr(embedded, "load_default_model", refuse)
    before = (report.out / "ablation" / "matrix.json").read_bytes()
    again = map_model(report.config, progress=False, log=lambda message: None)
    assert all(record["cached"] for record in again.stages.values())
    assert (report.out / "ablation" / "matrix.json").read_bytes() == before
    assert set(again.figures) == FIGURES


@pytest.mark.slow
def test_changing_k_reruns_only_the_stages_that_depend_on_it(report, tmp_path, one_thread):
    out = tmp_path / "copy"
    shutil.copytree(report.out, out)
    config = MapConfig.from_dict({**report.config.to_dict(), "out": str(out), "k": 0.2})
    result = map_model(config, progress=False, log=lambda message: None)
    ran = {name for name, record in result.stages.items() if not record["cached"]}
    assert ran == {"neurons", "ablation", "heads", "selection"}  # heads: the head sets are top-k too
    assert len(result.neuron_sets()["arith"]) == 3 * 10


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("no /usr/bin/chromium: the manual check is in the tl_taskmap.report docstring (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", f"--screenshot={shot}", "--window-size=1200,3000", report.html.resolve().as_uri()],
        capture_output=True, text=True, timeout=1800)  # a hang guard only
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC), done.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a rendered page with figures, not a blank one


@pytest.mark.real_model
@pytest.mark.slow
def test_cli_maps_the_real_default_model(tmp_path):
    from tl_taskmap.report.config import DEFAULT_TASKS

    names = list(DEFAULT_TASKS[:2])
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "tl_taskmap", "map", "--out", str(out), "--task-names", *names, "--examples", "8", "--seeds", "1",
         "--train-controls", "1", "--control-steps", "1", "--quiet"],
        capture_output=True, text=True, timeout=4 * 3600)  # a hang guard only: a loaded machine can be 10x slower
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip().splitlines()[-1]) == out / "report.html"
    baseline = pd.read_csv(out / "baseline.csv")
    assert list(baseline["task"]) == names and baseline["metric_value"].notna().all()
    text = (out / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    # 4 evaluation examples: dims-for-99% sits at its cap min(n - 1, d) everywhere, so the page says so instead of plotting it
    capped = "every task and layer sits at the cap" in text
    assert {img["alt"] for img in page.images} == FIGURES - ({"dims_99"} if capped else set())


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_report(tmp_path, one_thread):
    """``torchrun -m tl_taskmap map`` on 2 CPU ranks (gloo): relevance and layer statistics are sharded and merged,
    rank 0 writes; every number matches one process (up to float64 summation order)."""
    import os
    import socket

    from safetensors.torch import load_file

    config = tiny_config(tmp_path / "single", write_tasks(tmp_path / "tasks"), examples=16, batch_size=2, seeds=1)
    single = map_model(config, progress=False, log=lambda message: None)
    sharded_out = tmp_path / "sharded"
    MapConfig.from_dict({**config.to_dict(), "out": str(sharded_out)}).save(tmp_path / "sharded.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", TL_TASKMAP_DIST_TIMEOUT="300")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs = [subprocess.Popen([sys.executable, "-m", "tl_taskmap", "map", "--config", str(tmp_path / "sharded.json"), "--quiet",
                               "--threads", "1"], cwd=tmp_path, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=3600) for p in procs]  # a hang guard only
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == [str(sharded_out / "report.html"), ""]  # one rank speaks
    stats = single.layer_stats()
    for task in ("sentiment", "arith"):
        a = load_file(single.out / "relevance" / f"{task}.safetensors")
        b = load_file(sharded_out / "relevance" / f"{task}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)
    assert load_neuron_sets(sharded_out, ["sentiment", "arith"]) == single.neuron_sets()
    sharded_stats = pd.read_csv(sharded_out / "layers" / "layer_stats.csv")
    reference = stats.to_dataframe()
    assert len(sharded_stats) == len(reference)
    assert sharded_stats["value"].to_numpy() == pytest.approx(reference["value"].to_numpy(), rel=1e-6, abs=1e-9, nan_ok=True)
    pd.testing.assert_frame_equal(pd.read_csv(sharded_out / "baseline.csv"), single.baseline())
    pd.testing.assert_frame_equal(pd.read_csv(sharded_out / "ablation" / "cells.csv"), pd.read_csv(single.out / "ablation" / "cells.csv"))
    assert (sharded_out / "report.html").is_file()
    from tl_taskmap.stats.results import LayerStats

    assert LayerStats.load(sharded_out / "layers" / "stats").meta["distributed"] == {"world_size": 2, "by": "examples"}
