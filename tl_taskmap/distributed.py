"""The same analyses over many processes or GPUs, with ``torch.distributed`` launched by ``torchrun``.

Every statistic here is a sum over examples, so each rank takes a shard, accumulates, and the
accumulators are merged exactly:

* :func:`shard_range` / :func:`shard` split examples into *contiguous blocks of whole batches*,
  balanced, in rank order. Each rank then runs exactly the batches one process would run (same
  rows, same padding), so activations are bitwise the same and merged float64 statistics differ from
  a single process only in summation order (~1e-15 relative). ``by="tasks"`` gives whole tasks to ranks.
* :func:`all_merge` merges any accumulator with ``state_dict()/from_state_dict()/merge()`` (CKA,
  covariance), :class:`~tl_taskmap.neurons.attribution.RelevanceScores` and
  :class:`~tl_taskmap.stats.results.LayerStats` over the process group, in rank order; every rank gets
  the identical result (merged once, then broadcast). Nothing is pickled: states travel as bytes in
  ``uint8`` tensors behind a JSON header.
* :func:`distributed_compare_models` and :func:`distributed_relevance` return on every rank what
  :func:`~tl_taskmap.stats.runner.compare_models` / ``relevance`` return in one process.
* :func:`init_distributed`, :func:`maybe_distributed` and :func:`fail_fast` set up the group (nccl on
  CUDA, gloo on CPU) with timeouts, and turn an error on one rank into a failed job, not a hang.

Example (``torchrun --nproc_per_node=8 my_script.py``)::

    with maybe_distributed():
        stats = distributed_compare_models({"sft": sft, "base": base}, suite, batch_size=16)
        if is_main_process():
            stats.save("out/layers")
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import importlib
import json
import os
import struct
import sys
import traceback
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from tl_taskmap.state_io import join_state, split_state

__all__ = [
    "all_merge", "assign_tasks", "barrier", "broadcast_module", "distributed_compare_models", "distributed_relevance",
    "fail_fast", "init_distributed", "is_main_process", "launched_with_torchrun", "main_process_only",
    "maybe_distributed", "rank", "shard", "shard_range", "shard_suite", "shard_task", "world_size",
]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default; override with timeout= or $TL_TASKMAP_DIST_TIMEOUT (seconds)


# ---------------------------------------------------------------------------- the process group
def _active(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: Any = None) -> int:
    """This process's rank (0 when torch.distributed is not initialised). Example: ``rank() == 0``."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: Any = None) -> int:
    """Number of ranks (1 when torch.distributed is not initialised). Example: ``world_size() == 1``."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


_rank, _world_size = rank, world_size  # for functions whose arguments are called rank / world_size


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain process): the rank that writes files.

    >>> is_main_process()
    True
    """
    return rank() == 0


def barrier(group: Any = None) -> None:
    """Wait for every rank (a no-op in a plain process)."""
    if _active(group):
        dist.barrier(group=group)


def launched_with_torchrun() -> bool:
    """True when the environment says this process is one of several ranks (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout(timeout: Any) -> datetime.timedelta:
    if timeout is None:
        timeout = float(os.environ.get("TL_TASKMAP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    return timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))


def _local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: Optional[str] = None, timeout: Any = None, gpus_per_rank: int = 1) -> torch.device:
    """Join the process group described by torchrun's variables; return this rank's (first) device.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``. With CUDA, rank
    ``LOCAL_RANK`` owns GPUs ``LOCAL_RANK * gpus_per_rank`` onwards (more than one for a model split
    across GPUs with ``device_map``) and its collectives use the first. ``timeout`` (seconds or a
    timedelta; default ``$TL_TASKMAP_DIST_TIMEOUT`` or 30 min) bounds every collective, so a rank that
    died or hangs fails the job instead of stalling it.

    Example:
        >>> device = init_distributed(timeout=600)   # doctest: +SKIP
    """
    if dist.is_initialized():
        return _local_device()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed needs torchrun's environment, but {missing} are not set; launch with "
                           "`torchrun --nproc_per_node=N script.py` (or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available():
        first = int(os.environ.get("LOCAL_RANK", "0")) * gpus_per_rank
        if first + gpus_per_rank > torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={first // gpus_per_rank} with {gpus_per_rank} GPU(s) per rank needs GPUs up to "
                               f"{first + gpus_per_rank - 1}, but {torch.cuda.device_count()} are visible; lower --nproc_per_node.")
        torch.cuda.set_device(first)
        if backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective tears the rank down
            kwargs["device_id"] = torch.device("cuda", first)
    dist.init_process_group(backend, timeout=_timeout(timeout), **kwargs)
    return _local_device()


def _abort_group() -> None:
    """Drop this rank's connections so peers blocked in a collective fail now, not at the timeout."""
    with contextlib.suppress(Exception):
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        (abort or dist.destroy_process_group)()


@contextlib.contextmanager
def fail_fast(exit_code: int = 1) -> Iterator[None]:
    """Context manager / decorator: an exception on one rank ends the whole job with its error.

    With several ranks, the traceback is printed with the rank, the group is aborted (peers waiting in
    a collective get an error at once) and the process exits with ``exit_code``; torchrun then stops
    the other ranks. In a plain process the exception propagates unchanged.

    Example:
        >>> with fail_fast():                         # doctest: +SKIP
        ...     stats = distributed_compare_models(models, suite)
    """
    try:
        yield
    except BaseException as err:
        if not _active() or (isinstance(err, SystemExit) and err.code in (0, None)):
            raise
        print(f"{traceback.format_exc()}\ntl_taskmap: rank {rank()} of {world_size()} failed, stopping the job: "
              f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        _abort_group()
        os._exit(exit_code)  # no interpreter shutdown: it can block on a communicator that peers still use


@contextlib.contextmanager
def maybe_distributed(backend: Optional[str] = None, timeout: Any = None, gpus_per_rank: int = 1) -> Iterator[Optional[torch.device]]:
    """Under torchrun: join the group, fail fast on errors, leave the group at the end; else do nothing.

    Yields this rank's device under torchrun, ``None`` in a plain process (keep your own device).

    Example:
        >>> with maybe_distributed() as device:      # doctest: +SKIP
        ...     model = load_model(path, device=device or "cpu")
    """
    if not launched_with_torchrun() or dist.is_initialized():
        yield _local_device() if dist.is_initialized() else None
        return
    device = init_distributed(backend, timeout, gpus_per_rank)
    try:
        with fail_fast():
            yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main_process_only(fn: Callable[..., T]) -> Callable[..., Optional[T]]:
    """Decorator: run ``fn`` on rank 0 only (None elsewhere), then wait until it is done everywhere.

    Example:
        >>> @main_process_only
        ... def write(stats): stats.save("out/layers")   # doctest: +SKIP
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Optional[T]:
        result = fn(*args, **kwargs) if is_main_process() else None
        barrier()
        return result

    return wrapper


# ---------------------------------------------------------------------------- sharding
def shard_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None, *, block: int = 1) -> range:
    """This rank's contiguous share of ``range(n)``: whole ``block``s, balanced, in rank order.

    Blocks are split as evenly as possible (earlier ranks take the extra block); a final partial
    block joins the last full one, so every non-empty share holds at least ``min(n, block)`` items.

    >>> [list(shard_range(11, r, 3, block=2)) for r in range(3)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    >>> [len(shard_range(3, r, 2, block=4)) for r in range(2)]
    [3, 0]
    """
    r = _rank() if rank is None else rank
    w = _world_size() if world_size is None else world_size
    if block < 1 or n < 0 or not 0 <= r < w:
        raise ValueError(f"need n >= 0, block >= 1 and 0 <= rank < world_size; got n={n}, block={block}, rank={r}, world_size={w}")
    n_blocks = n // block
    if n_blocks == 0:
        return range(0, n if r == 0 else 0)
    q, extra = divmod(n_blocks, w)
    first = r * q + min(r, extra)
    last = first + q + (1 if r < extra else 0)
    return range(first * block, n if last == n_blocks and last > first else last * block)


def shard(items: Sequence[T], rank: Optional[int] = None, world_size: Optional[int] = None, *, block: int = 1) -> list[T]:
    """The items of this rank (see :func:`shard_range`).

    >>> shard(list("abcdefg"), 1, 2, block=2)
    ['e', 'f', 'g']
    """
    span = shard_range(len(items), rank, world_size, block=block)
    return list(items[span.start:span.stop])


def shard_task(task: Any, rank: Optional[int] = None, world_size: Optional[int] = None, *, block: int = 1) -> Any:
    """This rank's examples of ``task`` as a Task with the same name, or None when it has none.

    >>> from tl_taskmap.tasks import Task
    >>> t = Task.from_lists("t", ["a", "b", "c"], [" x", " y", " z"])
    >>> len(shard_task(t, 0, 2)), len(shard_task(t, 1, 2))
    (2, 1)
    """
    span = shard_range(len(task), rank, world_size, block=block)
    return dataclasses.replace(task, examples=task.examples[span.start:span.stop], meta=dict(task.meta)) if len(span) else None


def assign_tasks(sizes: Sequence[int], world_size: Optional[int] = None) -> list[int]:
    """Owner rank of each task: largest tasks first, each to the least-loaded rank (ties: lower rank).

    >>> assign_tasks([10, 10, 5, 30], 2)
    [1, 1, 1, 0]
    """
    w = _world_size() if world_size is None else world_size
    load, owner = [0] * w, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner[i] = min(range(w), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


def shard_suite(tasks: Any, by: str = "examples", rank: Optional[int] = None, world_size: Optional[int] = None,
                *, block: int = 1) -> list[Any]:
    """This rank's work: every task's example shard (``by="examples"``) or whole tasks (``"tasks"``).

    Returns a list of Tasks in suite order (possibly empty: a rank can have nothing to do).

    >>> from tl_taskmap.tasks import Task
    >>> ts = [Task.from_lists(n, ["a"] * k, [" x"] * k) for n, k in (("p", 4), ("q", 2))]
    >>> [(t.name, len(t)) for t in shard_suite(ts, "examples", 1, 2)], [t.name for t in shard_suite(ts, "tasks", 1, 2)]
    ([('p', 2), ('q', 1)], ['q'])
    """
    from tl_taskmap.tasks import as_suite

    suite, r, w = as_suite(tasks), _rank() if rank is None else rank, _world_size() if world_size is None else world_size
    if by == "tasks":
        owners = assign_tasks([len(t) for t in suite], w)
        return [t for t, o in zip(suite, owners) if o == r]
    if by != "examples":
        raise ValueError(f"by must be 'examples' or 'tasks', got {by!r}")
    return [p for p in (shard_task(t, r, w, block=block) for t in suite) if p is not None]


# ---------------------------------------------------------------------------- bytes over collectives
def _pack(doc: Any, tensors: dict[str, Tensor]) -> Tensor:
    """``[8-byte header length][JSON header][raw tensor bytes]`` as one uint8 tensor (exact for any dtype)."""
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, raw.numel()])
        chunks.append(raw)
        offset += raw.numel()
    head = json.dumps({"doc": doc, "tensors": entries}).encode()
    prefix = torch.frombuffer(bytearray(struct.pack("<Q", len(head)) + head), dtype=torch.uint8)
    return torch.cat([prefix, *chunks])


def _unpack(payload: Tensor) -> tuple[Any, dict[str, Tensor]]:
    data = payload.to("cpu")
    (n,) = struct.unpack("<Q", data[:8].numpy().tobytes())
    head = json.loads(data[8:8 + n].numpy().tobytes())
    base = 8 + n
    return head["doc"], {name: data[base + off:base + off + size].clone().view(getattr(torch, dtype)).reshape(shape)
                         for name, dtype, shape, off, size in head["tensors"]}


def _comm_device(group: Any = None) -> torch.device:
    return _local_device() if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _global(r: int, group: Any) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _sizes(payload: Optional[Tensor], group: Any) -> list[int]:
    dev = _comm_device(group)
    mine = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(mine) for _ in range(world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def _padded(payload: Optional[Tensor], size: int, group: Any) -> Tensor:
    buf = torch.zeros(size, dtype=torch.uint8, device=_comm_device(group))
    if payload is not None:
        buf[:payload.numel()] = payload.to(buf.device)
    return buf


def _all_gather_payloads(payload: Optional[Tensor], group: Any = None) -> list[Optional[Tensor]]:
    sizes = _sizes(payload, group)
    if max(sizes) == 0:
        return [None] * len(sizes)
    bufs = [_padded(None, max(sizes), group) for _ in sizes]
    dist.all_gather(bufs, _padded(payload, max(sizes), group), group=group)
    return [b[:s].cpu() if s else None for b, s in zip(bufs, sizes)]


def _gather_payloads(payload: Optional[Tensor], dst: int, group: Any = None) -> list[Optional[Tensor]]:
    """Every rank's payload on ``dst`` (in rank order; None where a rank had none); ``[]`` elsewhere."""
    sizes, me = _sizes(payload, group), rank(group)
    if max(sizes) == 0:
        return [None] * len(sizes) if me == dst else []
    bufs = [_padded(None, max(sizes), group) for _ in sizes] if me == dst else None
    dist.gather(_padded(payload, max(sizes), group), bufs, dst=_global(dst, group), group=group)
    return [b[:s].cpu() if s else None for b, s in zip(bufs, sizes)] if me == dst else []


def _broadcast_payload(payload: Optional[Tensor], src: int, group: Any = None) -> Optional[Tensor]:
    dev, me = _comm_device(group), rank(group)
    size = torch.tensor([payload.numel() if me == src and payload is not None else 0], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=_global(src, group), group=group)
    if int(size) == 0:
        return None
    buf = payload.to(dev) if me == src else torch.empty(int(size), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=_global(src, group), group=group)
    return buf.cpu()


# ---------------------------------------------------------------------------- merging
def _encode(obj: Any) -> tuple[dict, dict[str, Tensor]]:
    """Any object with ``state_dict()`` and ``merge()``: its class and its state (tensors + JSON)."""
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "merge", None))):
        raise TypeError(f"all_merge needs an object with state_dict() and merge() (an accumulator, a probe, "
                        f"RelevanceScores) or a LayerStats; got {type(obj).__name__}.")
    doc, tensors = split_state(obj.state_dict())
    return {"module": type(obj).__module__, "class": type(obj).__qualname__, "state": doc}, tensors


def _decode(doc: dict, tensors: dict[str, Tensor], template: Any = None) -> Any:
    """Rebuild with ``cls.from_state_dict(state)``, or ``load_state_dict`` on an empty copy of ``template``."""
    cls = getattr(importlib.import_module(doc["module"]), doc["class"])
    state = join_state(doc["state"], tensors)
    if hasattr(cls, "from_state_dict"):
        return cls.from_state_dict(state)
    if template is None:
        raise ValueError(f"this rank passed None, but a {cls.__name__} is rebuilt with load_state_dict on the rank's own "
                         "object: pass an empty one (e.g. a probe with no data) on ranks without data")
    fresh = template.empty_copy() if hasattr(template, "empty_copy") else copy.copy(template)
    return fresh.load_state_dict(state) or fresh


def _merge_in_order(objs: Sequence[Any]) -> Any:
    merged = None
    for obj in objs:
        if obj is not None:
            merged = obj if merged is None else (merged.merge(obj) or merged)  # merge is in place or returns the result
    return merged


def all_merge(obj: Any, group: Any = None, *, keep_accumulators: bool = True) -> Any:
    """Merge ``obj`` of every rank, in rank order, exactly; every rank gets the identical result.

    ``obj`` is anything with ``state_dict()`` and ``merge()``: an accumulator (``StreamingLinearCKA``,
    ``StreamingCovariance``), ``RelevanceScores``, any probe (rebuilt with ``load_state_dict`` on an
    empty copy of the rank's own probe, so pass an empty probe rather than None), or a ``LayerStats``
    (whose accumulators are merged on separate ranks). A rank with nothing to add may pass None
    (for classes with ``from_state_dict``). The merge runs once (rank 0; for LayerStats each accumulator on its
    own rank) and the result is broadcast, so ranks agree bitwise. In a plain process ``obj`` is returned.
    ``keep_accumulators=False`` drops the merged accumulators of a LayerStats (its numbers are kept).

    Example:
        >>> acc = StreamingCovariance(d).add(my_shard)      # doctest: +SKIP
        >>> acc = all_merge(acc)                            # doctest: +SKIP
    """
    if not _active(group):
        return obj
    from tl_taskmap.stats.results import LayerStats

    kinds = {_unpack(p)[0] for p in _all_gather_payloads(None if obj is None else _pack(type(obj).__name__, {}), group) if p is not None}
    if len(kinds) > 1:
        raise TypeError(f"all_merge got different kinds of objects on different ranks: {sorted(kinds)}.")
    if kinds == {LayerStats.__name__}:
        return _all_merge_layer_stats(obj, group, keep_accumulators)
    payload = None if obj is None else _pack(*_encode(obj))
    parts = _gather_payloads(payload, 0, group)
    merged = _merge_in_order([_decode(*_unpack(p), obj) if p is not None else None for p in parts]) if rank(group) == 0 else None
    out = _broadcast_payload(None if merged is None else _pack(*_encode(merged)), 0, group)
    return None if out is None else _decode(*_unpack(out), obj)


def broadcast_module(module: torch.nn.Module, src: int = 0, group: Any = None) -> torch.nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (in place).

    Use it after a step that may differ across ranks (e.g. training a control model on each rank).

    Example:
        >>> broadcast_module(control_model)   # doctest: +SKIP
    """
    if not _active(group):
        return module
    dev = _comm_device(group)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "meta":
                continue
            buf = t.detach().to(dev)
            dist.broadcast(buf, src=_global(src, group), group=group)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)
    return module


# ---------------------------------------------------------------------------- LayerStats
_STORES = ("eigenvalues", "means", "samples")


def _layer_stats_light(stats: Any) -> tuple[dict, dict[str, Tensor]]:
    """Everything of a LayerStats except the accumulators' states (those travel one at a time)."""
    tensors = {f"{name}.{i}": t for name in _STORES for i, t in enumerate(getattr(stats, name).values())}
    doc = {"tasks": stats.tasks, "models": stats.models, "pairs": [list(p) for p in stats.pairs], "layers": stats.layers,
           "meta": stats.meta, "cka": [[*k, v] for k, v in stats.cka.items()], "spectra": [[*k, v] for k, v in stats.spectra.items()],
           "arrays": {name: [list(k) for k in getattr(stats, name)] for name in _STORES},
           "accumulators": None if stats.accumulators is None else [list(k) for k in stats.accumulators]}
    return doc, tensors


def _check_mergeable(parts: list[tuple[int, dict, dict]], holders: dict[tuple, list[int]]) -> None:
    task_ranks: dict[str, list[int]] = {}
    for r, doc, _ in parts:
        for t in doc["tasks"]:
            task_ranks.setdefault(t, []).append(r)
    for t, ranks in task_ranks.items():
        if len(ranks) < 2:
            continue
        if any(doc["accumulators"] is None for r, doc, _ in parts if r in ranks):
            raise ValueError(f"task {t!r} is on ranks {ranks}; merging it needs every rank's accumulators "
                             "(compare_models(..., keep_accumulators=True)).")
        odd = [k for k, rs in holders.items() if k[1] == t and rs != ranks]
        if odd:
            raise ValueError(f"task {t!r}: accumulator {odd[0]} is on ranks {holders[odd[0]]} only, the task on {ranks}; "
                             "every rank must compare the same models, sites and layers.")


def _summaries(owned: dict[tuple, Any], estimators: Sequence[str], group: Any) -> dict[str, dict]:
    """CKA values / spectra of the accumulators each rank merged, shared with every rank."""
    from tl_taskmap.stats.results import summarise_cka, summarise_spectrum

    doc: dict[str, list] = {"cka": [], "spectra": []}
    eigs = {}
    for key, acc in owned.items():
        where = f"task {key[1]!r} {key[2:]}"
        if key[0] == "cka":
            doc["cka"].append([*key[1:], summarise_cka(acc, estimators, where)])
        else:
            values, eigs[f"eig.{len(doc['spectra'])}"] = summarise_spectrum(acc, where)
            doc["spectra"].append([*key[1:], values])
    out: dict[str, dict] = {"cka": {}, "spectra": {}, "eigenvalues": {}}
    for payload in _all_gather_payloads(_pack(doc, eigs), group):
        d, ts = _unpack(payload)
        out["cka"].update({tuple(r[:-1]): r[-1] for r in d["cka"]})
        for i, r in enumerate(d["spectra"]):
            out["spectra"][tuple(r[:-1])], out["eigenvalues"][tuple(r[:-1])] = r[-1], ts[f"eig.{i}"]
    return out


def _fold(parts: list[tuple[int, dict, dict]], merged: dict[str, dict], accs: Optional[dict], global_index: bool) -> Any:
    """``LayerStats.merge`` over the ranks' parts in rank order, with shared statistics from ``merged``."""
    from tl_taskmap.stats.results import LayerStats

    meta = parts[0][1]["meta"]
    bound = int(meta.get("max_samples_per_task", 200))
    out: dict[str, dict] = {name: {} for name in ("cka", "spectra", *_STORES)}
    tasks: dict[str, dict] = {}
    models: list[str] = []
    pairs: list[tuple] = []
    layers: dict[str, set] = {}
    for _, doc, tensors in parts:
        models += [m for m in doc["models"] if m not in models]
        pairs += [tuple(p) for p in doc["pairs"] if tuple(p) not in pairs]
        for kind, ls in doc["layers"].items():
            layers.setdefault(kind, set()).update(ls)
        stores = {name: {tuple(k): tensors[f"{name}.{i}"] for i, k in enumerate(keys)} for name, keys in doc["arrays"].items()}
        stores["cka"] = {tuple(r[:-1]): r[-1] for r in doc["cka"]}
        stores["spectra"] = {tuple(r[:-1]): r[-1] for r in doc["spectra"]}
        for t, info in doc["tasks"].items():
            if t not in tasks:
                tasks[t] = info
                for name, store in stores.items():
                    out[name].update({k: v for k, v in store.items() if k[0] == t})
                continue
            n_a, n_b = tasks[t]["n_examples"], info["n_examples"]
            for k, mean in stores["means"].items():
                if k[0] == t:
                    out["means"][k] = (n_a * out["means"][k] + n_b * mean) / (n_a + n_b)
            for k, sample in stores["samples"].items():
                if k[0] == t:
                    out["samples"][k] = torch.cat([out["samples"][k], sample])[:bound]
            index = tasks[t]["sample_index"] + [i + (0 if global_index else n_a) for i in info["sample_index"]]
            tasks[t] = {**tasks[t], "n_examples": n_a + n_b, "n_dropped": tasks[t]["n_dropped"] + info["n_dropped"],
                        "sample_index": index[:bound]}
    for name, values in merged.items():
        out[name].update(values)
    return LayerStats(tasks=tasks, models=models, pairs=pairs, layers={k: sorted(v) for k, v in layers.items()},
                      accumulators=accs, meta=meta, **out)


def _all_merge_layer_stats(stats: Any, group: Any, keep_accumulators: bool, global_index: bool = False) -> Any:
    """LayerStats over ranks: shared accumulators merged on rank ``i % world`` (in rank order), summaries shared."""
    from tl_taskmap.stats.cka import StreamingLinearCKA
    from tl_taskmap.stats.results import ESTIMATORS
    from tl_taskmap.stats.spectral import StreamingCovariance

    me, w, dev = rank(group), world_size(group), _comm_device(group)
    light = _all_gather_payloads(None if stats is None else _pack(*_layer_stats_light(stats)), group)
    parts = [(r, *_unpack(p)) for r, p in enumerate(light) if p is not None]
    if not parts:
        return None
    holders: dict[tuple, list[int]] = {}
    for r, doc, _ in parts:
        for k in doc["accumulators"] or []:
            holders.setdefault(tuple(k), []).append(r)
    _check_mergeable(parts, holders)
    mine = (stats.accumulators or {}) if stats is not None else {}
    shared = [k for k, rs in holders.items() if len(rs) > 1]
    owner = {k: i % w for i, k in enumerate(shared)}
    kind = {"cka": StreamingLinearCKA, "cov": StreamingCovariance}
    owned = {}
    for key in shared:  # each rank merges 1/world of the accumulators: memory and eigendecompositions split
        got = _gather_payloads(_pack({}, mine[key].state_dict()) if key in mine else None, owner[key], group)
        if me == owner[key]:
            owned[key] = _merge_in_order([kind[key[0]].from_state_dict(_unpack(p)[1], device=dev) for p in got if p is not None])
    merged = _summaries(owned, parts[0][1]["meta"].get("estimators", ESTIMATORS), group)
    accs = None
    if keep_accumulators and any(doc["accumulators"] is not None for _, doc, _ in parts):
        accs = {}
        for key, rs in holders.items():
            src = owner.get(key, rs[0])
            acc = owned.get(key, mine.get(key)) if me == src else None
            payload = _broadcast_payload(None if acc is None else _pack({}, acc.state_dict()), src, group)
            accs[key] = kind[key[0]].from_state_dict(_unpack(payload)[1], device="cpu")
    return _fold(parts, merged, accs, global_index)


# ---------------------------------------------------------------------------- runners
def _work(suite: Any, by: str, block: int, group: Any) -> list[tuple[Any, Optional[Any], int]]:
    """``(task, this rank's part or None, offset of the part)`` for every task, in suite order."""
    me, w = rank(group), world_size(group)
    if by == "tasks":
        owners = assign_tasks([len(t) for t in suite], w)
        return [(t, t if o == me else None, 0) for t, o in zip(suite, owners)]
    if by != "examples":
        raise ValueError(f"by must be 'examples' or 'tasks', got {by!r}")
    return [(t, shard_task(t, me, w, block=block), shard_range(len(t), me, w, block=block).start) for t in suite]


def _keep_global_samples(local: Any, name: str, offset: int, chosen: Any, bound: int) -> None:
    """Keep the sampled rows one process would sample (indices ``chosen`` of the whole task), indexed globally."""
    info = local.tasks[name]
    index, chosen = [i + offset for i in info["sample_index"]], set(chosen.tolist())
    keep = [i in chosen for i in index]
    mask = torch.tensor(keep, dtype=torch.bool)
    for key in [k for k in local.samples if k[0] == name]:
        local.samples[key] = local.samples[key][mask]
    info["sample_index"] = [i for i, k in zip(index, keep) if k]
    local.meta["max_samples_per_task"] = bound


def distributed_compare_models(models: Any, tasks: Any, *, by: str = "examples", control_models: Optional[dict] = None,
                               control_name: str = "control", keep_accumulators: bool = False, batch_size: int = 8,
                               max_examples: Optional[int] = None, max_samples_per_task: int = 200, seed: int = 0,
                               estimators: Sequence[str] = ("biased", "debiased"), progress: bool = True,
                               group: Any = None, **kwargs: Any) -> Any:
    """:func:`~tl_taskmap.stats.runner.compare_models` over all ranks; every rank returns the same LayerStats.

    ``by="examples"`` (default) shards each task's examples in blocks of whole batches and merges the
    task before the next starts (one task's accumulators held at a time). ``by="tasks"`` gives whole
    tasks to ranks: bitwise the one-process numbers and no merging, best with many equal tasks. The
    result equals one process up to float64 summation order, sampled representations included.
    ``control_models`` values may be zero-argument loaders (``lambda: load(path)``), called only on the
    ranks that run the task and dropped after it, so 60 control models never share memory. Other
    keywords go to ``compare_models``. In a plain process the tasks run one after another.

    Example:
        >>> stats = distributed_compare_models({"sft": sft, "base": base}, suite, batch_size=16)   # doctest: +SKIP
    """
    from tl_taskmap.stats.runner import _sample_index, compare_models
    from tl_taskmap.tasks import as_suite

    active = _active(group)
    by = by if active else "tasks"
    estimators = [estimators] if isinstance(estimators, str) else list(estimators)
    suite = as_suite(tasks)
    if max_examples:
        suite = as_suite([dataclasses.replace(t, examples=t.examples[:max_examples]) for t in suite])
    need = 4 if "debiased" in estimators else 2  # fewest examples a shard may hold (compare_models checks it)
    results = []
    for task, part, offset in _work(suite, by, batch_size * -(-need // batch_size), group):
        local = None
        if part is not None:
            here = dict(control_name=control_name, batch_size=batch_size, seed=seed, estimators=estimators, **kwargs)
            control = (control_models or {}).get(task.name)
            if control is not None and callable(control) and not isinstance(control, torch.nn.Module):
                control = control()
            if control is None and kwargs.get("pairs") is not None:  # compare_models rejects pairs naming an absent control
                here["pairs"] = [p for p in kwargs["pairs"] if control_name not in (p.split(" vs ") if isinstance(p, str) else p)]
            with warnings.catch_warnings():
                if by == "examples":  # shard-level numbers are recomputed after the merge: their warnings are noise
                    warnings.filterwarnings("ignore", message=r".*(recorded as NaN|is inflated)")
                local = compare_models(models, part, control_models=None if control is None else {task.name: control},
                                       keep_accumulators=keep_accumulators or by == "examples", progress=progress and is_main_process(),
                                       max_samples_per_task=len(part) if by == "examples" else max_samples_per_task, **here)
            del control
            if by == "examples":
                _keep_global_samples(local, task.name, offset, _sample_index(len(task), max_samples_per_task, seed), max_samples_per_task)
        results.append(_all_merge_layer_stats(local, group, keep_accumulators, global_index=by == "examples") if active else local)
        del local
    controls = {t: r.meta["control_models"][t] for r in results for t in r.tasks if t in r.meta.get("control_models", {})}
    return _concat(results, max_examples=max_examples, max_samples_per_task=max_samples_per_task, control_models=controls,
                   distributed={"world_size": world_size(group), "by": by})


def _concat(results: list[Any], **meta: Any) -> Any:
    """One LayerStats from per-task results (disjoint tasks), without re-merging anything."""
    from tl_taskmap.stats.results import LayerStats

    first = results[0]
    stores = {name: {k: v for r in results for k, v in getattr(r, name).items()}
              for name in ("tasks", "cka", "spectra", *_STORES)}
    accs = None if all(r.accumulators is None for r in results) else {k: v for r in results for k, v in (r.accumulators or {}).items()}
    models = list(dict.fromkeys(m for r in results for m in r.models))
    pairs = list(dict.fromkeys(p for r in results for p in r.pairs))
    kinds = dict.fromkeys(kind for r in results for kind in r.layers)
    layers = {kind: sorted({x for r in results for x in r.layers.get(kind, [])}) for kind in kinds}
    return LayerStats(models=models, pairs=pairs, layers=layers, accumulators=accs, meta={**first.meta, **meta}, **stores)


def distributed_relevance(model: Any, tasks: Any, *, by: str = "examples", batch_size: int = 8, progress: bool = False,
                          group: Any = None, **kwargs: Any) -> Any:
    """Grad × act relevance over all ranks: a ``RelevanceScores`` for a Task, else ``{task name: scores}``.

    Every rank returns the same result, equal to ``relevance`` / ``relevance_by_task`` in one process
    up to float64 summation order. Keywords (``aggregate``, ``positions``, ``loss_fn``, ...) go to
    :func:`~tl_taskmap.neurons.attribution.relevance`.

    Example:
        >>> rels = distributed_relevance(model, suite, batch_size=16)   # doctest: +SKIP
        >>> sets = {name: r.top(0.1) for name, r in rels.items()}      # doctest: +SKIP
    """
    from tl_taskmap.neurons.attribution import relevance
    from tl_taskmap.tasks import Task, as_suite

    out = {}
    for task, part, _ in _work(as_suite(tasks), by, batch_size, group):
        local = None if part is None else relevance(model, part, batch_size=batch_size,
                                                    progress=progress and is_main_process(), **kwargs)
        out[task.name] = all_merge(local, group)
    return next(iter(out.values())) if isinstance(tasks, Task) else out
