"""Neuron selection methods that separate a task's *own* neurons from the ones every task uses.

Every method scores each MLP neuron (``blocks.{l}.mlp.hook_post``) for each task from the task's
*selection* examples only, and takes the top ``k`` of the scores (per layer or globally) as the
task's :class:`~tl_taskmap.neurons.sets.NeuronSet`. ``r_t(j)`` below is the gradxact relevance of
neuron ``j`` for task ``t``.

* ``gradxact`` (default; Leng & Xiong 2024, Eq. 2-3): ``r_t(j) = Σ_i Σ_t |∂L_i/∂a · a|`` with ``L_i``
  the mean answer NLL, summed over the answer positions (:mod:`tl_taskmap.neurons.attribution`).
* ``contrastive``: the same attribution of the *margin* between the correct answer and the others.
  Each option ``o`` of example ``i`` is scored as in evaluation, ``s_o`` = mean log-probability of
  its tokens after the prompt, and ``m_i = s_correct − mean_{o ≠ correct} s_o``. The score is
  ``c_t(j) = Σ_i |Σ_{rows r of i} Σ_{answer positions p of r} ∂m_i/∂a_{r,p,j} · a_{r,p,j}|``: the
  first-order change of example ``i``'s margin when the neuron is zeroed at the answer positions of
  all its option rows. The absolute value is taken per example, after summing over the options, so a
  neuron that raises every answer alike (an "answer-shaped" neuron) cancels out. Generation tasks
  (no options) use a *matched corrupted target*: the target of the next example of the same task
  whose target differs (cyclically), so the two "options" are the true target and a task-shaped but
  wrong one.
* ``specific``: relevance weighted by the task's share of it across the tasks of the suite. With
  ``r̂_t = r_t / Σ_j r_t(j)`` (each task's relevance normalised to total 1, so task size does not
  count), ``share_t(j) = r̂_t(j) / Σ_u r̂_u(j)`` and ``specific_t(j) = r̂_t(j) · share_t(j)``. A
  neuron only task ``t`` uses keeps its relevance; one all ``T`` tasks use equally keeps ``1/T`` of it.
* ``exclusive``: the gradxact top-k set minus the *shared* neurons, those in the gradxact top-k set of
  at least ``max(2, ⌈T/2⌉)`` of the ``T`` tasks (at least two, so that with two tasks a neuron in one
  set is not "shared"). The sets are smaller than ``k``; the scores are ``r_t`` with shared neurons at 0.

A user-supplied method is any callable ``score_fn(model, suite) -> {task name: [n_layers, d_mlp]
scores}``; :func:`select_neurons` takes its top ``k`` and every downstream analysis (ablation matrix,
:func:`~tl_taskmap.neurons.selection_compare.compare_selections`) treats it like the built-in ones.

Example:
    >>> from tl_taskmap.neurons.selection import select_neurons
    >>> sel = select_neurons(model, selection_suite, "specific", k=0.1)   # doctest: +SKIP
    >>> sel.sets["sst2"], sel.scores["sst2"].shape                      # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_taskmap.evaluate import answer_nll
from tl_taskmap.models import ModelAdapter, TokenBatch, as_adapter
from tl_taskmap.neurons.attribution import _relevance_mode, position_mask, relevance
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task, TaskSuite, as_suite

METHODS = ("gradxact", "contrastive", "specific", "exclusive")
Scores = dict[str, Float[Tensor, "n_layers d_mlp"]]
ScoreFn = Callable[[Any, TaskSuite], Mapping[str, Tensor]]
TasksLike = Union[Task, Sequence[Task], Mapping[str, Task], TaskSuite]


# ------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class Selection:
    """One selection method's result: per task the neuron scores and the chosen set.

    Attributes:
        method: The method's name. scores: task → float64 ``[n_layers, d_mlp]`` scores.
        sets: task → :class:`NeuronSet` (named after the task; meta records the method).
        k, per_layer: The top-k rule used. meta: JSON-able extras (e.g. the shared set's size).

    Example:
        >>> sel = select_neurons(model, suite, "exclusive")   # doctest: +SKIP
        >>> sel.to_dataframe()                                 # doctest: +SKIP
    """

    method: str
    scores: Scores
    sets: dict[str, NeuronSet]
    k: float
    per_layer: bool
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per task: ``method, task, n_neurons`` and the mean Jaccard overlap with the other tasks' sets."""
        rows = []
        for name, neurons in self.sets.items():
            others = [neurons.jaccard(o) for n, o in self.sets.items() if n != name]
            rows.append({"method": self.method, "task": name, "n_neurons": len(neurons),
                         "mean_jaccard_other": sum(others) / len(others) if others else math.nan})
        return pd.DataFrame(rows, columns=["method", "task", "n_neurons", "mean_jaccard_other"])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(s)}" for n, s in list(self.sets.items())[:6]) + (", ..." if len(self.sets) > 6 else "")
        return f"Selection({self.method!r}, k={self.k}, per_layer={self.per_layer}, sets={{{sizes}}})"


# ------------------------------------------------------------------------------------ scores
def gradxact_scores(model: Any, tasks: TasksLike, *, batch_size: int = 8) -> Scores:
    """The paper's ``Σ |∂L/∂a · a|`` on the answer loss per task (:func:`~tl_taskmap.neurons.attribution.relevance`).

    Example:
        >>> gradxact_scores(model, suite)["sst2"].shape   # doctest: +SKIP
        torch.Size([3, 48])
    """
    return {t.name: relevance(model, t, batch_size=batch_size).scores for t in as_suite(tasks)}


def contrastive_options(task: Task) -> list[tuple[str, tuple[str, ...], int]]:
    """``(prompt, options, index of the correct one)`` per example, as the contrastive method scores them.

    Multiple choice: the example's own options. Generation: ``(target, corrupted)`` where the
    corrupted target is the next example's (cyclically) whose target differs.

    Raises:
        ValueError: a generation task whose targets are all the same (nothing to contrast with).

    Example:
        >>> t = Task.from_lists("g", ["1+1=", "2+2="], [" 2", " 4"], metric="exact_match")
        >>> contrastive_options(t)
        [('1+1=', (' 2', ' 4'), 0), ('2+2=', (' 4', ' 2'), 0)]
    """
    out = []
    n = len(task.examples)
    for i, e in enumerate(task.examples):
        if e.options is not None:
            out.append((e.prompt, tuple(e.options), int(e.label)))  # type: ignore[arg-type]
            continue
        corrupted = next((task.examples[(i + s) % n].target for s in range(1, n) if task.examples[(i + s) % n].target != e.target), None)
        if corrupted is None:
            raise ValueError(f"task {task.name!r}: every example has the target {e.target!r}, so there is no matched corrupted "
                             "target to contrast with; give the examples options or use another method")
        out.append((e.prompt, (e.target, corrupted), 0))
    return out


def _chunks(items: Sequence[tuple[str, tuple[str, ...], int]], rows_per_batch: int) -> Iterator[list[tuple[str, tuple[str, ...], int]]]:
    chunk: list[tuple[str, tuple[str, ...], int]] = []
    rows = 0
    for item in items:
        if chunk and rows + len(item[1]) > rows_per_batch:
            yield chunk
            chunk, rows = [], 0
        chunk.append(item)
        rows += len(item[1])
    if chunk:
        yield chunk


def example_margins(option_scores: Float[Tensor, " rows"], example_of_row: Int[Tensor, " rows"], is_correct: Tensor,
                    n_examples: int) -> Float[Tensor, " n_examples"]:
    """``m_i = s_correct − mean_{o ≠ correct} s_o`` from per-row option scores (rows grouped by example).

    Example:
        >>> example_margins(torch.tensor([-1.0, -3.0, -2.0]), torch.tensor([0, 0, 0]), torch.tensor([True, False, False]), 1)
        tensor([1.5000])
    """
    correct = torch.zeros(n_examples, dtype=option_scores.dtype, device=option_scores.device)
    wrong_sum = torch.zeros_like(correct)
    n_wrong = torch.zeros_like(correct)
    correct = correct.index_add(0, example_of_row, option_scores * is_correct)
    wrong_sum = wrong_sum.index_add(0, example_of_row, option_scores * ~is_correct)
    n_wrong = n_wrong.index_add(0, example_of_row, (~is_correct).to(option_scores.dtype))
    return correct - wrong_sum / n_wrong.clamp(min=1)


def _contrastive_batch(adapter: ModelAdapter, hook_names: list[str], chunk: list[tuple[str, tuple[str, ...], int]]
                       ) -> tuple[Float[Tensor, "n_layers d_mlp"], Float[Tensor, "n_layers d_mlp"]]:
    """``(Σ_i |Σ g·a|, Σ_i Σ g·a)`` of the margins of one chunk of examples (one forward, one backward)."""
    prompts = [p for p, opts, _ in chunk for _ in opts]
    options = [o for _, opts, _ in chunk for o in opts]
    example_of_row = torch.tensor([i for i, (_, opts, _) in enumerate(chunk) for _ in opts])
    is_correct = torch.tensor([j == label for _, opts, label in chunk for j in range(len(opts))])
    batch = adapter.tokenize(prompts, options).to(adapter.device)
    mask = position_mask(batch, "answer")
    acts: dict[int, Tensor] = {}

    def keep(layer: int) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if not act.requires_grad:  # parameters are frozen, so the first layers start the graph here
                act = act.detach().requires_grad_(True)
            acts[layer] = act
            return act

        return hook

    n_layers = len(hook_names)
    with _relevance_mode(adapter.model), adapter.hooks([(name, keep(layer)) for layer, name in enumerate(hook_names)]):
        logits = adapter.forward(batch)
        scores = -answer_nll(logits, batch)
        margins = example_margins(scores, example_of_row.to(scores.device), is_correct.to(scores.device), len(chunk))
        if not bool(torch.isfinite(margins).all()):
            raise ValueError("the option log-likelihoods are NaN or infinite; contrastive relevance would be NaN")
        grads = torch.autograd.grad(margins.sum(), [acts[layer] for layer in range(n_layers)], allow_unused=True)
    sum_abs = torch.zeros(n_layers, int(adapter.d_mlp), dtype=torch.float64)
    signed = torch.zeros_like(sum_abs)
    for layer, grad in enumerate(grads):
        if grad is None:
            continue
        prod = (grad.double() * acts[layer].detach().double() * mask[..., None].to(grad.device)).sum(1).cpu()  # [rows, d_mlp]
        per_example = torch.zeros(len(chunk), prod.shape[1], dtype=torch.float64).index_add(0, example_of_row, prod)
        sum_abs[layer], signed[layer] = per_example.abs().sum(0), per_example.sum(0)
    return sum_abs, signed


def contrastive_scores(model: Any, tasks: TasksLike, *, batch_size: int = 8) -> Scores:
    """Attribution of the correct-vs-other-options margin per task (see the module docstring).

    ``batch_size`` is the number of (example, option) rows per forward pass (an example's rows
    stay together).

    Example:
        >>> contrastive_scores(model, suite)["sst2"].shape   # doctest: +SKIP
    """
    adapter = as_adapter(model)
    if adapter.d_mlp is None:
        raise ValueError("the model's cfg has no d_mlp: contrastive relevance needs MLP neurons (mlp.hook_post)")
    hook_names = [adapter.hook_name(layer, "mlp_post") for layer in range(adapter.n_layers)]
    out: Scores = {}
    for task in as_suite(tasks):
        total = torch.zeros(adapter.n_layers, int(adapter.d_mlp), dtype=torch.float64)
        for chunk in _chunks(contrastive_options(task), batch_size):
            try:
                total += _contrastive_batch(adapter, hook_names, chunk)[0]
            except ValueError as err:
                raise ValueError(f"task {task.name!r}: {err}") from None
        out[task.name] = total
    return out


def _check_scores(scores: Mapping[str, Tensor], what: str) -> Scores:
    if not scores:
        raise ValueError(f"{what}: no tasks were scored")
    checked: Scores = {}
    shape = None
    for name, value in scores.items():
        value = torch.as_tensor(value).detach().to("cpu", torch.float64)
        if value.ndim != 2 or (shape is not None and value.shape != shape):
            raise ValueError(f"{what}: scores of task {name!r} have shape {tuple(value.shape)}; every task needs [n_layers, d_mlp]"
                             + (f" = {tuple(shape)}" if shape is not None else ""))
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{what}: scores of task {name!r} contain NaN or infinite values")
        shape = value.shape
        checked[str(name)] = value
    return checked


def specific_scores(gradxact: Mapping[str, Tensor]) -> Scores:
    """``specific_t(j) = r̂_t(j) · r̂_t(j) / Σ_u r̂_u(j)`` with ``r̂_t = r_t / Σ_j r_t(j)`` (0 where no task uses ``j``).

    Needs at least two tasks (the share is across tasks).

    Example:
        >>> s = specific_scores({"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[0.0, 2.0]])})
        >>> [round(v, 3) for v in s["a"][0].tolist()], [round(v, 3) for v in s["b"][0].tolist()]
        ([0.5, 0.167], [0.0, 0.667])
    """
    scores = _check_scores(gradxact, "specific")
    if len(scores) < 2:
        raise ValueError(f"the specific method weighs a task's relevance against the other tasks': it needs ≥ 2 tasks, got {list(scores)}")
    if any(bool((v < 0).any()) for v in scores.values()):
        raise ValueError("specific scores need non-negative relevance (e.g. Σ|g·a|)")
    normed = {n: v / v.sum() if float(v.sum()) > 0 else torch.zeros_like(v) for n, v in scores.items()}
    total = sum(normed.values())
    safe = torch.where(total > 0, total, torch.ones_like(total))  # type: ignore[arg-type]
    return {n: torch.where(total > 0, v * v / safe, torch.zeros_like(v)) for n, v in normed.items()}  # type: ignore[arg-type]


def shared_neurons(sets: Mapping[str, NeuronSet], min_tasks: Optional[int] = None) -> NeuronSet:
    """Neurons in at least ``min_tasks`` of the sets (default ``max(2, ⌈T/2⌉)`` for ``T`` sets).

    Example:
        >>> a, b, c = NeuronSet(1, 4, {0: [0, 1]}), NeuronSet(1, 4, {0: [0, 2]}), NeuronSet(1, 4, {0: [3]})
        >>> shared_neurons({"a": a, "b": b, "c": c}).indices(0).tolist()
        [0]
    """
    if not sets:
        raise ValueError("shared_neurons needs at least one set")
    first = next(iter(sets.values()))
    threshold = max(2, math.ceil(len(sets) / 2)) if min_tasks is None else int(min_tasks)
    counts = torch.zeros(first.shape, dtype=torch.long)
    for neurons in sets.values():
        counts += neurons.to_mask().long()
    return NeuronSet.from_mask(counts >= threshold, name="shared", meta={"min_tasks": threshold, "n_tasks": len(sets)})


# ------------------------------------------------------------------------------------ selection
def _top_sets(scores: Scores, method: str, k: float, per_layer: bool) -> dict[str, NeuronSet]:
    return {n: NeuronSet.top_k(s, k, per_layer=per_layer, name=n, meta={"task": n, "selection": method, "k": k, "per_layer": per_layer})
            for n, s in scores.items()}


def select_neurons(model: Any, tasks: TasksLike, method: Union[str, ScoreFn] = "gradxact", *, k: float = 0.1,
                   per_layer: bool = True, batch_size: int = 8, gradxact: Optional[Mapping[str, Tensor]] = None) -> Selection:
    """Each task's neurons under a selection method (scores from ``tasks`` only: pass the selection split).

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter.
        tasks: The tasks (their selection examples).
        method: ``"gradxact"``, ``"contrastive"``, ``"specific"``, ``"exclusive"`` or a callable
            ``score_fn(model, suite) -> {task: [n_layers, d_mlp] scores}`` (top ``k`` of its scores).
        k, per_layer: Top-k fraction, per layer or global (as :meth:`NeuronSet.top_k`).
        batch_size: Rows per forward/backward pass.
        gradxact: Precomputed gradxact scores per task (e.g. from a report's relevance stage) to reuse.

    Example:
        >>> sel = select_neurons(model, selection, "contrastive", k=0.1)   # doctest: +SKIP
        >>> sel.sets["sst2"].counts_per_layer()                             # doctest: +SKIP
    """
    suite = as_suite(tasks)
    if not (isinstance(k, (int, float)) and 0 < k <= 1):
        raise ValueError(f"k must be in (0, 1] (a fraction: 0.1 = top 10%), got {k!r}")
    if callable(method):
        name = getattr(method, "__name__", type(method).__name__)
        scores = _check_scores(method(model, suite), f"selection method {name!r}")
        missing = [t for t in suite.names if t not in scores]
        if missing:
            raise ValueError(f"selection method {name!r} returned no scores for tasks {missing}")
        return Selection(name, scores, _top_sets(scores, name, k, per_layer), k, per_layer, {"user_supplied": True})
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}: use one of {METHODS} or pass a callable score_fn(model, suite)")
    if method == "contrastive":
        scores = contrastive_scores(model, suite, batch_size=batch_size)
        return Selection(method, scores, _top_sets(scores, method, k, per_layer), k, per_layer)
    if gradxact is None:
        base = gradxact_scores(model, suite, batch_size=batch_size)
    else:
        base = _check_scores({t: gradxact[t] for t in suite.names if t in gradxact}, "gradxact")
        if set(base) != set(suite.names):
            raise ValueError(f"gradxact= lacks scores for tasks {sorted(set(suite.names) - set(base))}")
    if method == "gradxact":
        return Selection(method, base, _top_sets(base, method, k, per_layer), k, per_layer)
    if method == "specific":
        scores = specific_scores(base)
        return Selection(method, scores, _top_sets(scores, method, k, per_layer), k, per_layer)
    top = _top_sets(base, "gradxact", k, per_layer)
    if len(top) < 2:
        raise ValueError(f"the exclusive method removes neurons shared across tasks: it needs ≥ 2 tasks, got {list(top)}")
    shared = shared_neurons(top)
    keep = ~shared.to_mask()
    sets = {n: (s - shared).with_name(n, {**s.meta, "selection": "exclusive", "shared_removed": len(s & shared)}) for n, s in top.items()}
    scores = {n: torch.where(keep, v, torch.zeros_like(v)) for n, v in base.items()}
    return Selection(method, scores, sets, k, per_layer, {"n_shared": len(shared), "shared_min_tasks": shared.meta["min_tasks"]})


def select_all(model: Any, tasks: TasksLike, methods: Sequence[Union[str, ScoreFn]] = METHODS, **kwargs: Any) -> dict[str, Selection]:
    """:func:`select_neurons` for several methods, computing gradxact once. Keyed by method name.

    Example:
        >>> sels = select_all(model, selection, ["gradxact", "specific"])   # doctest: +SKIP
    """
    suite = as_suite(tasks)
    gradxact = kwargs.pop("gradxact", None)
    needs_base = any(m in ("gradxact", "specific", "exclusive") for m in methods if isinstance(m, str))
    if gradxact is None and needs_base:
        gradxact = gradxact_scores(model, suite, batch_size=kwargs.get("batch_size", 8))
    out: dict[str, Selection] = {}
    for method in methods:
        sel = select_neurons(model, suite, method, gradxact=gradxact, **kwargs)
        if sel.method in out:
            raise ValueError(f"two selection methods are named {sel.method!r}; give user-supplied functions distinct names")
        out[sel.method] = sel
    return out
