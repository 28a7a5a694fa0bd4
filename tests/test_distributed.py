"""tl_taskmap.distributed: sharding and packing in-process; merging, runners and failures across real ranks.

The multi-rank tests start separate CPU processes (gloo, 127.0.0.1 only) running the scripts in
``tests/distributed_workers/``, exactly as torchrun would (same environment variables).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny_models
from tests.distributed_workers import common
from tl_taskmap import distributed as D
from tl_taskmap.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "distributed_workers"


# ---------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("n,world,block", [(0, 3, 1), (1, 4, 1), (7, 3, 1), (26, 4, 4), (9, 3, 4), (3, 2, 4), (100, 8, 8)])
def test_shard_range_covers_everything_in_whole_blocks(n, world, block):
    spans = [D.shard_range(n, r, world, block=block) for r in range(world)]
    assert [i for s in spans for i in s] == list(range(n))  # contiguous, in rank order, nothing twice
    assert all(s.start % block == 0 for s in spans if len(s))  # each rank runs the batches one process would
    sizes = [len(s) for s in spans]
    if n:
        assert sizes[0] > 0 and all(x >= min(n, block) for x in sizes if x)
    full = [x // block for x in sizes]
    assert max(full) - min(full) <= 1  # balanced to one block


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank < world_size"):
        D.shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="block >= 1"):
        D.shard_range(10, 0, 2, block=0)


def test_shard_suite_by_examples_and_by_tasks():
    tasks = [Task.from_lists(name, ["p"] * n, [" x"] * n) for name, n in (("a", 9), ("b", 2), ("c", 30))]
    by_examples = [D.shard_suite(tasks, "examples", r, 3, block=4) for r in range(3)]
    assert [[(t.name, len(t)) for t in part] for part in by_examples] == [
        [("a", 4), ("b", 2), ("c", 12)], [("a", 5), ("c", 8)], [("c", 10)]]
    owners = D.assign_tasks([len(t) for t in tasks], 2)
    assert owners == [1, 1, 0] and D.assign_tasks([len(t) for t in tasks], 2) == owners  # deterministic
    assert [t.name for t in D.shard_suite(tasks, "tasks", 1, 2)] == ["a", "b"]
    assert D.shard_task(tasks[1], 2, 3) is None
    with pytest.raises(ValueError, match="by must be"):
        D.shard_suite(tasks, "layers", 0, 2)


def test_pack_round_trips_every_dtype_exactly():
    tensors = {"f64": torch.randn(3, 4, dtype=torch.float64), "bf16": torch.randn(5).to(torch.bfloat16),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(7), "empty": torch.zeros(0, 2),
               "strided": torch.arange(12.0).reshape(3, 4).T}
    doc = {"nan": math.nan, "key": ["cka", "t", 3]}
    back_doc, back = D._unpack(D._pack(doc, tensors))
    assert math.isnan(back_doc["nan"]) and back_doc["key"] == ["cka", "t", 3]
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name


@pytest.mark.filterwarnings("ignore:biased CKA")
def test_one_process_gives_the_plain_calls(bridge_llama, bridge_gpt2):
    from tl_taskmap.neurons.attribution import relevance_by_task
    from tl_taskmap.stats.runner import compare_models

    suite = common.suite()
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process() and not D.launched_with_torchrun()
    acc = torch.ones(2)
    assert D.all_merge(acc) is acc
    models = {"a": bridge_llama, "b": bridge_gpt2}  # the tiny models share one tokenizer
    plain = compare_models(models, suite, control_models={"alpha": bridge_llama}, progress=False, **common.COMPARE_KW)
    stats = D.distributed_compare_models(models, suite, control_models={"alpha": lambda: bridge_llama},  # a loader
                                         progress=False, **common.COMPARE_KW)
    assert stats.tasks == plain.tasks and stats.cka == plain.cka and stats.spectra == plain.spectra
    assert stats.pairs == plain.pairs and stats.meta["control_models"] == plain.meta["control_models"]
    rels, plain_rels = D.distributed_relevance(bridge_llama, suite, batch_size=4), relevance_by_task(bridge_llama, suite, batch_size=4)
    assert all(torch.equal(rels[n].sum_abs, plain_rels[n].sum_abs) for n in plain_rels)
    with D.fail_fast(), pytest.raises(KeyError):  # a plain process keeps its exceptions
        raise KeyError("x")
    with D.maybe_distributed() as device:
        assert device is None


def test_init_distributed_names_missing_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed()


# ---------------------------------------------------------------------------- across processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on loopback whatever the host name resolves to
    return env


def _ranks(script: str, args: list[str], world: int) -> list[subprocess.Popen]:
    """``world`` processes with the variables torchrun would set."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, str(WORKERS / script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=_env(MASTER_PORT=port, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      LOCAL_WORLD_SIZE=str(world)))
            for r in range(world)]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def test_all_merge_over_three_ranks_equals_one_process(tmp_path):
    results = _finish(_ranks("merge_and_fail.py", ["merge", str(tmp_path)], 3), timeout=120)
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s["span"][1] - s["span"][0] for s in seen] == [4, 5, 0]  # the last rank merges nothing in
    for s in seen:
        merged, single = s["merged"], s["single"]
        assert merged["n"] == single["n"] == 9 and merged["n_examples"] == 9 and merged["name"] == "task"
        for key in ("cka", "eig", "sum_abs"):
            assert merged[key] == pytest.approx(single[key], rel=1e-10), key
    assert seen[0]["merged"] == seen[1]["merged"] == seen[2]["merged"]  # bitwise the same on every rank


def test_a_failing_rank_fails_the_job_with_its_error(tmp_path):
    (code0, err0), (code1, err1) = _finish(_ranks("merge_and_fail.py", ["raise", str(tmp_path)], 2), timeout=900)  # hang guard only
    assert code1 != 0 and "ValueError: deliberate failure on rank 1" in err1 and "rank 1 of 2 failed" in err1
    assert code0 != 0 and "rank 0 of 2 failed" in err0  # the waiting peer stops too...
    assert "Timed out" not in err0  # ...because its peer failed, not because its own timeout ran out


@pytest.mark.slow
def test_a_hung_rank_times_out_instead_of_hanging(tmp_path):
    procs = _ranks("merge_and_fail.py", ["hang", str(tmp_path)], 2)
    try:
        _, err0 = procs[0].communicate(timeout=900)  # a hang guard only: the rank's own (short) timeout must end it first
    finally:
        procs[1].kill()  # the hung rank: a launcher (torchrun) would stop it once rank 0 failed
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert "rank 0 of 2 failed" in err0 and "Timed out" in err0  # its collective timed out instead of hanging


@pytest.mark.slow
def test_two_ranks_give_the_single_process_statistics_and_relevance(tmp_path):
    """torchrun, 2 CPU ranks: CKA, spectra, means, samples and relevance as in one process (1e-10)."""
    from tl_taskmap.neurons.attribution import RelevanceScores, relevance_by_task
    from tl_taskmap.stats.results import LayerStats
    from tl_taskmap.stats.runner import compare_models

    folder = str(tiny_models.hf_folder("llama"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKERS / "compare.py"), str(tmp_path), folder]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    digests = [json.loads((tmp_path / f"digest_{r}.json").read_text()) for r in range(2)]
    assert digests[0] == digests[1]  # both ranks hold the same result

    models, controls = common.models(folder)
    suite = common.suite()
    with pytest.warns(UserWarning):
        single = compare_models(models, suite, control_models=controls, progress=False, **common.COMPARE_KW)
    rels = relevance_by_task(models["a"], suite, **common.RELEVANCE_KW)
    for by in ("examples", "tasks"):
        got = LayerStats.load(tmp_path / by / "stats")
        assert got.tasks == single.tasks and got.models == single.models and got.pairs == single.pairs
        assert set(got.cka) == set(single.cka) and set(got.spectra) == set(single.spectra)
        for key, values in single.cka.items():
            assert got.cka[key] == pytest.approx(values, rel=1e-10), (by, key)
        for key, values in single.spectra.items():
            assert got.spectra[key]["dims_99"] == values["dims_99"], (by, key)
            assert got.spectra[key]["participation_ratio"] == pytest.approx(values["participation_ratio"], rel=1e-10)
            top = single.eigenvalues[key][0]
            torch.testing.assert_close(got.eigenvalues[key], single.eigenvalues[key], rtol=1e-10, atol=1e-12 * float(top))
        for store in ("means", "samples"):
            for key, value in getattr(single, store).items():
                torch.testing.assert_close(getattr(got, store)[key], value, rtol=1e-10, atol=1e-12)
        for name, rel in rels.items():
            back = RelevanceScores.load(tmp_path / by / f"relevance_{name}.safetensors")
            assert (back.n_examples, back.n_tokens, back.name) == (rel.n_examples, rel.n_tokens, rel.name)
            torch.testing.assert_close(back.sum_abs, rel.sum_abs, rtol=1e-10, atol=0)
            torch.testing.assert_close(back.signed_sum, rel.signed_sum, rtol=1e-10, atol=1e-14)
    assert LayerStats.load(tmp_path / "examples" / "stats").accumulators  # kept when asked for


# Modules placed by accelerate: every module on the CPU, or layer 1 and the unembedding offloaded to disk
# (loaded for each forward by accelerate's hooks; TransformerLens 4.x only).
CPU_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu",
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
OFFLOAD_MAP = {**CPU_MAP, "model.layers.1": "disk", "lm_head": "disk"}
TL4 = int(importlib.metadata.version("transformer-lens").split(".")[0]) >= 4
needs_tl4 = pytest.mark.skipif(not TL4, reason="disk offload in device_map needs TransformerLens 4.x")


def _capture_and_relevance(model, task):
    from tl_taskmap.activations import capture
    from tl_taskmap.neurons.attribution import relevance

    return capture(model, task.prompts, "resid_post", progress=False, batch_size=4), relevance(model, task, batch_size=4)


def _boot_mapped(device_map, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    offload = {"offload_folder": str(tmp_path)} if "disk" in device_map.values() else {}
    return TransformerBridge.boot_transformers(str(tiny_models.hf_folder("llama")), device_map=device_map, **offload)


@pytest.mark.parametrize("device_map", [CPU_MAP, pytest.param(OFFLOAD_MAP, marks=needs_tl4)], ids=["cpu", "disk-offload"])
def test_device_map_keeps_capture_and_relevance_exact(device_map, tmp_path, bridge_llama):
    """The ``device_map`` path of TransformerBridge (accelerate dispatch), as far as a CPU can test it."""
    task = common.suite()[1]
    acts, rel = _capture_and_relevance(bridge_llama, task)
    acts_mapped, rel_mapped = _capture_and_relevance(_boot_mapped(device_map, tmp_path), task)
    for name in acts:
        torch.testing.assert_close(acts_mapped[name], acts[name])
    torch.testing.assert_close(rel_mapped.sum_abs, rel.sum_abs)


@needs_tl4
def test_device_map_with_offloaded_embedding(tmp_path):
    _capture_and_relevance(_boot_mapped({**OFFLOAD_MAP, "model.embed_tokens": "disk"}, tmp_path), common.suite()[1])
