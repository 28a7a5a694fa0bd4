"""Continual learning with task neurons: NCFT and W-NCFT (Leng & Xiong 2024, §4.3 and App. A.2),
sequential full fine-tuning and per-task fine-tuning baselines, the accuracy matrix and forgetting.

* **ncft**: at stage j, find task j's neurons on the *current* model (``select_neurons``; default the
  top-``k`` grad × activation relevance, per layer) and train only them (:func:`finetune`).
* **w-ncft**: the same training; at inference the trained columns are merged per task,
  ``W' = Σ_k sim[k] · W^(k)``, where ``W^(k)`` is every neuron column as it stood right after stage k
  and ``sim = softmax(cos(query, v_k) / temperature)`` over the task vectors ``v_k`` of the tasks
  trained so far. Task vector = mean over the task's training prompts of the base model's last-layer
  ``resid_post`` averaged over prompt tokens (features always come from the model *before* any
  continual training, as the paper uses Llama-2-7b's features). ``routing="task"`` (default) uses the
  evaluated task's own mean eval-prompt feature as the query, so one merge serves a whole task;
  ``routing="input"`` uses each input's feature (one merge per example). Columns never trained are
  untouched; with one-hot ``sim`` the merge reproduces the stage-k checkpoint's trained columns.
* **seq-ft**: all parameters, task after task. **per-task-ft**: a fresh copy of the base model per
  task (the upper bound); task i keeps its own model, so a[i][j] = a[i][i] for every j ≥ i.

Metrics, with ``a[i, j]`` the metric of task i after stage j (0-based here, 1-based in the paper):

* average accuracy (the paper's CL) = mean_i a[i, N-1];
* FG_j = mean_{i<j} a[i, j] / A_i × 100 %, with A_i = a[i, i] the score right after training task i
  (our reading of Scialom et al. 2022 as cited). FG is the share of the earlier tasks' scores that is
  *retained*: 100 % means nothing was forgotten; tasks with A_i = 0 are skipped; FG_0 is NaN.
  ``forgetting_pct = 100 − FG``.
* BWT_j = mean_{i<j} (a[i, j] − a[i, i]) (Lopez-Paz & Ranzato 2017); negative means forgetting.

A task may appear only once in a sequence (the matrix is indexed by name): rename a revisit.

Example:
    >>> from tl_taskmap.neurons.ncft import continual_learning
    >>> res = continual_learning(model, [suite["sst2"], suite["qqp"]], method="ncft", steps=30, lr=1e-3)  # doctest: +SKIP
    >>> res.accuracy_matrix, res.average_accuracy, res.forgetting()                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.evaluate import TaskScore, evaluate_task
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.masked_training import copy_model as _copy_model  # the parameter copy_model shadows the name
from tl_taskmap.neurons.masked_training import finetune
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task
from tl_taskmap.state_io import FORMAT_VERSIONS

FORMAT_VERSION = FORMAT_VERSIONS["continual_learning"]
METHODS = ("ncft", "w-ncft", "seq-ft", "per-task-ft")
Method = Literal["ncft", "w-ncft", "seq-ft", "per-task-ft"]
Selector = Callable[[Any, Task], NeuronSet]

# ------------------------------------------------------------------------------------------ metrics


def average_accuracy(matrix: Float[np.ndarray, "n_tasks n_stages"]) -> float:
    """The paper's CL: mean over tasks of the score after the last stage. Example: ``average_accuracy([[.8, .6], [0, .9]]) == 0.75``."""
    return float(np.mean(np.asarray(matrix, dtype=float)[:, -1]))


def forgetting_fg(matrix: Float[np.ndarray, "n_tasks n_stages"]) -> Float[np.ndarray, " n_stages"]:
    """FG_j = mean_{i<j} a[i, j] / a[i, i] × 100 per stage (NaN at stage 0; tasks with a[i, i] = 0 skipped).

    Example:
        >>> forgetting_fg([[0.8, 0.6], [0.1, 0.9]]).round(1).tolist()
        [nan, 75.0]
    """
    a = np.asarray(matrix, dtype=float)
    out = np.full(a.shape[1], np.nan)
    for j in range(1, a.shape[1]):
        ratios = [a[i, j] / a[i, i] for i in range(min(j, a.shape[0])) if a[i, i] > 0]
        out[j] = 100 * float(np.mean(ratios)) if ratios else np.nan
    return out


def backward_transfer(matrix: Float[np.ndarray, "n_tasks n_stages"]) -> Float[np.ndarray, " n_stages"]:
    """BWT_j = mean_{i<j} (a[i, j] − a[i, i]) per stage (NaN at stage 0). The usual BWT is the last entry.

    Example:
        >>> backward_transfer([[0.8, 0.6], [0.1, 0.9]]).round(2).tolist()
        [nan, -0.2]
    """
    a = np.asarray(matrix, dtype=float)
    out = np.full(a.shape[1], np.nan)
    for j in range(1, a.shape[1]):
        out[j] = float(np.mean([a[i, j] - a[i, i] for i in range(min(j, a.shape[0]))]))
    return out


# ------------------------------------------------------------------------------------------ W-NCFT


def task_features(model: Any, task: Task, *, batch_size: int = 8) -> Float[Tensor, "n d_model"]:
    """Per-example feature: last block's ``resid_post`` averaged over the prompt's real tokens.

    Example:
        >>> task_features(model, task).shape   # doctest: +SKIP
        torch.Size([16, 576])
    """
    from tl_taskmap.activations import capture

    adapter = as_adapter(model)
    site = (adapter.n_layers - 1, "resid_post")
    acts = capture(adapter, task.prompts, sites=[site], reduce="mean", batch_size=batch_size, progress=False)
    return acts[site].double()


def task_similarity(query: Float[Tensor, "... d"], vectors: Float[Tensor, "k d"], temperature: float = 1.0) -> Float[Tensor, "... k"]:
    """``softmax(cos(query, v_k) / temperature)`` over the rows of ``vectors`` (App. A.2 has temperature 1).

    Example:
        >>> task_similarity(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])).round(decimals=3).tolist()
        [0.731, 0.269]
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    cos = torch.nn.functional.cosine_similarity(query.double().unsqueeze(-2), vectors.double(), dim=-1)
    return torch.softmax(cos / temperature, dim=-1)


class TaskWeightBank:
    """Each stage's trained neuron columns (W-NCFT's ``W_task-k``), and the column-wise merge.

    Call :meth:`before_stage` before training a stage and :meth:`after_stage` after it, on the model
    being trained; :meth:`merged` then swaps merged columns in for a ``with`` block.

    Example:
        >>> bank = TaskWeightBank(model)                              # doctest: +SKIP
        >>> bank.before_stage(n1); finetune(model, t1, n1); bank.after_stage(n1)   # doctest: +SKIP
        >>> with bank.merged([0.3, 0.7]): evaluate_task(model, t1)   # doctest: +SKIP
    """

    def __init__(self, model: Any):
        self.adapter = as_adapter(model)
        self._initial: dict[int, list[Tensor]] = {}  # layer -> each role's tensor before its first training
        self._stages: list[dict[int, tuple[Tensor, list[Tensor]]]] = []  # layer -> (indices, values per role)

    def __len__(self) -> int:
        return len(self._stages)

    def before_stage(self, neurons: NeuronSet) -> None:
        for layer in neurons.layers():
            if layer not in self._initial:
                self._initial[layer] = [p.param.detach().clone() for p in self.adapter.neuron_params(layer)]

    def after_stage(self, neurons: NeuronSet) -> None:
        missing = [layer for layer in neurons.layers() if layer not in self._initial]
        if missing:
            raise RuntimeError(f"before_stage was not called for layers {missing}")
        self._stages.append({layer: (neurons.indices(layer), [p.neuron_slice(neurons.indices(layer)).clone()
                                                               for p in self.adapter.neuron_params(layer)])
                             for layer in neurons.layers()})

    @contextlib.contextmanager
    def merged(self, weights: Sequence[float] | Tensor) -> Iterator[None]:
        """Within the block, column c of every trained neuron is ``Σ_k weights[k] · W^(k)_c`` over the
        first ``len(weights)`` stages; the exact original values are put back on exit."""
        weights = [float(w) for w in weights]
        if not 1 <= len(weights) <= len(self._stages) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"need 1..{len(self._stages)} finite weights (one per recorded stage), got {weights}")
        stages = self._stages[: len(weights)]
        saved: list[tuple[Any, Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for layer in sorted({layer for stage in stages for layer in stage}):
                    cols = torch.unique(torch.cat([stage[layer][0] for stage in stages if layer in stage]))
                    for r, np_ in enumerate(self.adapter.neuron_params(layer)):
                        current = self._initial[layer][r].index_select(np_.dim, cols.to(np_.param.device)).movedim(np_.dim, 0).double()
                        total = torch.zeros_like(current)
                        for w, stage in zip(weights, stages):
                            if layer in stage:  # columns trained at this stage take their post-stage values
                                idx, values = stage[layer]
                                current[torch.searchsorted(cols, idx)] = values[r].double().to(current.device)
                            total += w * current
                        col_dev = cols.to(np_.param.device)
                        saved.append((np_, col_dev, np_.param.detach().index_select(np_.dim, col_dev)))
                        np_.param.index_copy_(np_.dim, col_dev, total.to(np_.param.dtype).movedim(0, np_.dim))
            yield
        finally:
            with torch.no_grad():
                for np_, col_dev, original in reversed(saved):
                    np_.param.index_copy_(np_.dim, col_dev, original)


# ------------------------------------------------------------------------------------------ result


def _nan_to_none(rows: Any) -> Any:
    return [[None if (v is None or math.isnan(v)) else v for v in row] for row in rows]


@dataclass
class ContinualResult:
    """Scores of a continual-learning run. ``accuracy[i][j]``: metric of task i after stage j (NaN: not evaluated).

    Attributes:
        method, task_names, metrics: what ran, in stage order, and each task's metric name.
        accuracy, loss: ``[n_tasks][n_stages]`` metric values and answer NLLs.
        initial, initial_loss: scores of the base model before any training (or None).
        n_neurons: neurons trained per stage (None for full fine-tuning).
        train_losses: per stage, the loss of every step.
        similarities: W-NCFT only: ``similarities[j][i]`` = sim weights used for task i after stage j.
        plain_accuracy, plain_loss: W-NCFT only: the same trained model without merging (= NCFT).
        config: the settings. model: the final trained model (not saved; None for per-task-ft).
    """

    method: str
    task_names: list[str]
    metrics: list[str]
    accuracy: list[list[float]]
    loss: list[list[float]]
    initial: Optional[list[float]] = None
    initial_loss: Optional[list[float]] = None
    n_neurons: list[Optional[int]] = field(default_factory=list)
    train_losses: list[list[float]] = field(default_factory=list)
    similarities: Optional[list[dict[str, list[float]]]] = None
    plain_accuracy: Optional[list[list[float]]] = None
    plain_loss: Optional[list[list[float]]] = None
    config: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def accuracy_matrix(self) -> Any:
        """pandas DataFrame: rows are tasks, columns the stages (``"after <task>"``)."""
        import pandas as pd

        return pd.DataFrame(self.accuracy, index=pd.Index(self.task_names, name="task"),
                            columns=pd.Index([f"after {t}" for t in self.task_names], name="stage"))

    @property
    def average_accuracy(self) -> float:
        """The paper's CL: mean score of all tasks after the last stage."""
        return average_accuracy(self.accuracy)

    def forgetting(self) -> Any:
        """Per stage: ``FG`` (% of earlier tasks' scores retained), ``forgetting_pct`` (100 − FG), ``BWT``, ``loss_BWT``."""
        import pandas as pd

        fg = forgetting_fg(self.accuracy)
        return pd.DataFrame({"stage": range(len(self.task_names)), "after": self.task_names, "FG": fg,
                             "forgetting_pct": 100 - fg, "BWT": backward_transfer(self.accuracy),
                             "loss_BWT": backward_transfer(self.loss)})

    def summary(self) -> dict[str, Any]:
        """``{"method", "average_accuracy", "FG", "forgetting_pct", "BWT", "loss_BWT"}`` after the last stage.

        ``loss_BWT`` is BWT on the answer loss: mean rise of the earlier tasks' loss (positive = forgetting),
        a finer signal than accuracy on small evaluation sets.
        """
        last = self.forgetting().iloc[-1]
        return {"method": self.method, "average_accuracy": self.average_accuracy, "FG": float(last["FG"]),
                "forgetting_pct": float(last["forgetting_pct"]), "BWT": float(last["BWT"]), "loss_BWT": float(last["loss_BWT"])}

    def to_dataframe(self) -> Any:
        """Long format: ``method, task, stage, after, metric, metric_value, loss`` (evaluated cells only)."""
        import pandas as pd

        rows = [{"method": self.method, "task": t, "stage": j, "after": self.task_names[j], "metric": self.metrics[i],
                 "metric_value": self.accuracy[i][j], "loss": self.loss[i][j]}
                for i, t in enumerate(self.task_names) for j in range(len(self.task_names)) if not math.isnan(self.accuracy[i][j])]
        return pd.DataFrame(rows)

    def as_ncft(self) -> "ContinualResult":
        """For a W-NCFT run: the unmerged scores of the same trained model, i.e. the NCFT result."""
        if self.plain_accuracy is None:
            raise ValueError(f"only a w-ncft result holds unmerged scores; this is {self.method!r}")
        return replace(self, method="ncft", accuracy=self.plain_accuracy, loss=self.plain_loss or self.loss,
                       similarities=None, plain_accuracy=None, plain_loss=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON (NaN as null, no model). Example: ``res.save("ncft.json"); ContinualResult.load("ncft.json")``."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "model"}
        for k in ("accuracy", "loss", "plain_accuracy", "plain_loss"):
            data[k] = _nan_to_none(data[k]) if data[k] is not None else None
        Path(path).write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "tl_taskmap.ContinualResult", **data}, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ContinualResult":
        data = json.loads(Path(path).read_text())
        if data.pop("kind", None) != "tl_taskmap.ContinualResult" or data.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"{path} is not a tl_taskmap ContinualResult v{FORMAT_VERSION}")
        for k in ("accuracy", "loss", "plain_accuracy", "plain_loss"):
            if data.get(k) is not None:
                data[k] = [[math.nan if v is None else v for v in row] for row in data[k]]
        return cls(**data)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"ContinualResult({self.method}: {' -> '.join(self.task_names)}; average={s['average_accuracy']:.3f}, "
                f"FG={s['FG']:.1f}%, BWT={s['BWT']:+.3f})")


# ------------------------------------------------------------------------------------------ runner


def _default_selector(k: float, per_layer: bool) -> Selector:
    def select(model: Any, task: Task) -> NeuronSet:
        from tl_taskmap.neurons.attribution import relevance  # imported here: relevance is optional for this module

        return relevance(model, task).top(k, per_layer=per_layer)

    return select


def _splits(tasks: Sequence[Task], eval_tasks: Optional[Sequence[Task]], train_fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("the task sequence is empty")
    seen: dict[str, int] = {}
    for j, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise TypeError(f"stage {j} is a {type(t).__name__}, expected a Task")
        if t.name in seen:
            raise ValueError(f"task {t.name!r} appears twice in the sequence (stages {seen[t.name]} and {j}); the accuracy "
                             f"matrix is indexed by task. To revisit it, rename the repeat: dataclasses.replace(task, name='{t.name}@2')")
        seen[t.name] = j
    if eval_tasks is None:
        pairs = [t.split(train_fraction, seed=seed) for t in tasks]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    eval_tasks = list(eval_tasks)
    if [t.name for t in eval_tasks] != [t.name for t in tasks]:
        raise ValueError(f"eval_tasks must name the same tasks in the same order: {[t.name for t in tasks]} vs {[t.name for t in eval_tasks]}")
    return tasks, eval_tasks


def continual_learning(
    model: Any,
    tasks: Sequence[Task],
    *,
    method: Method = "ncft",
    k: float = 0.1,
    per_layer: bool = True,
    select_neurons: Optional[Selector] = None,
    eval_tasks: Optional[Sequence[Task]] = None,
    train_fraction: float = 0.5,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: Any = "adamw",
    evaluate_all: bool = False,
    evaluate_initial: bool = True,
    routing: Literal["task", "input"] = "task",
    temperature: float = 1.0,
    eval_batch_size: int = 8,
    copy_model: bool = True,
    progress: bool = True,
) -> ContinualResult:
    """Train on ``tasks`` in order with ``method`` and score every task seen so far after each stage.

    Args:
        model: The base model. With ``copy_model=True`` (default) it is never changed.
        tasks: The sequence (Tasks with distinct names; a repeat raises ValueError).
        method: ``"ncft"``, ``"w-ncft"``, ``"seq-ft"`` or ``"per-task-ft"`` (see the module docstring).
        k, per_layer: NCFT's neuron share (0.1 = top 10 %) and whether top-k is per layer.
        select_neurons: ``fn(current_model, train_task) -> NeuronSet``; default top-``k`` relevance.
        eval_tasks: Held-out tasks by position; default: each task ``.split(train_fraction, seed)``.
        steps, lr, batch_size, weight_decay, seed, optimizer: per-stage :func:`finetune` settings
            (stage j uses ``seed + j``).
        evaluate_all: Also score the tasks not trained yet (below the diagonal; per-task-ft leaves them NaN).
        evaluate_initial: Score every task on the base model first (``result.initial``).
        routing, temperature: W-NCFT query (``"task"`` or ``"input"``) and softmax temperature.
        copy_model: Train a deep copy (default); False trains ``model`` itself in place (not per-task-ft).

    Example:
        >>> res = continual_learning(model, [t1, t2, t3], method="w-ncft", steps=30, lr=1e-3)   # doctest: +SKIP
        >>> res.summary()                                                                      # doctest: +SKIP
        {'method': 'w-ncft', 'average_accuracy': 0.71, 'FG': 93.2, 'forgetting_pct': 6.8, 'BWT': -0.04}
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if routing not in ("task", "input"):
        raise ValueError(f"routing must be 'task' or 'input', got {routing!r}")
    train, held_out = _splits(tasks, eval_tasks, train_fraction, seed)
    n = len(train)
    select = select_neurons or _default_selector(k, per_layer)
    base = as_adapter(model).model
    work = _copy_model(base) if copy_model and method != "per-task-ft" else base
    score = lambda m, t: evaluate_task(m, t, batch_size=eval_batch_size)  # noqa: E731
    nan = [[math.nan] * n for _ in range(n)]
    result = ContinualResult(method, [t.name for t in train], [str(t.metric) for t in held_out], copy.deepcopy(nan), copy.deepcopy(nan))
    result.config = {"k": k, "per_layer": per_layer, "steps": steps, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                     "seed": seed, "optimizer": str(optimizer), "train_fraction": train_fraction if eval_tasks is None else None,
                     "evaluate_all": evaluate_all, "routing": routing, "temperature": temperature,
                     "selector": "relevance top-k" if select_neurons is None else getattr(select_neurons, "__name__", "custom")}
    if evaluate_initial:
        scores = [score(base, t) for t in held_out]
        result.initial, result.initial_loss = [s.metric_value for s in scores], [s.loss for s in scores]
    bank = None
    if method == "w-ncft":  # features from the model before continual training (see module docstring)
        vectors = torch.stack([task_features(base, t).mean(0) for t in train])
        queries = [task_features(base, t) for t in held_out]
        bank, result.similarities = TaskWeightBank(work), []
        result.plain_accuracy, result.plain_loss = copy.deepcopy(nan), copy.deepcopy(nan)
    kw = dict(steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay, optimizer=optimizer, progress=progress)
    for j, task in enumerate(train):
        if method in ("ncft", "w-ncft"):
            neurons = select(work, task)
            if not isinstance(neurons, NeuronSet):
                raise TypeError(f"select_neurons returned {type(neurons).__name__}, expected a NeuronSet")
            neurons = neurons.with_name(task.name, {**neurons.meta, "stage": j})
            if bank is not None:
                bank.before_stage(neurons)
            fit = finetune(work, task, neurons, seed=seed + j, **kw)
            if bank is not None:
                bank.after_stage(neurons)
        elif method == "seq-ft":
            fit = finetune(work, task, "all", seed=seed + j, **kw)
        else:  # per-task-ft: a fresh copy, scored on its own task only; later stages keep that score
            own = _copy_model(base)
            fit = finetune(own, task, "all", seed=seed + j, **kw)
            s = score(own, held_out[j])
            del own
            for col in range(j, n):
                result.accuracy[j][col], result.loss[j][col] = s.metric_value, s.loss
        result.n_neurons.append(fit.n_neurons)
        result.train_losses.append(fit.losses)
        if method == "per-task-ft":
            continue
        sims: dict[str, list[float]] = {}
        for i in range(n if evaluate_all else j + 1):
            if bank is None:
                s = score(work, held_out[i])
            else:
                plain = score(work, held_out[i])
                result.plain_accuracy[i][j], result.plain_loss[i][j] = plain.metric_value, plain.loss  # type: ignore[index]
                if j == 0:  # one trained task: sim = [1] and the merge is the model itself
                    s, sims[held_out[i].name] = plain, [1.0]
                else:
                    s, sims[held_out[i].name] = _merged_score(work, bank, held_out[i], queries[i], vectors[: j + 1], routing, temperature, score)
            result.accuracy[i][j], result.loss[i][j] = s.metric_value, s.loss
        if result.similarities is not None:
            result.similarities.append(sims)
    result.model = None if method == "per-task-ft" else work
    return result


def _merged_score(model: Any, bank: TaskWeightBank, task: Task, features: Tensor, vectors: Tensor, routing: str,
                  temperature: float, score: Callable[[Any, Task], TaskScore]) -> tuple[TaskScore, list[float]]:
    if routing == "task":
        sim = task_similarity(features.mean(0), vectors, temperature)
        with bank.merged(sim):
            return score(model, task), sim.tolist()
    values, losses = [], []
    sims = task_similarity(features, vectors, temperature)
    for example, sim in zip(task.examples, sims):
        with bank.merged(sim):
            s = score(model, replace(task, examples=[example]))
        values.append(s.metric_value)
        losses.append(s.loss)
    merged = TaskScore(task.name, str(task.metric), float(np.mean(values)), float(np.mean(losses)), len(task), task.chance, values)
    return merged, sims.mean(0).tolist()


def compare_methods(model: Any, tasks: Sequence[Task], methods: Sequence[str] = METHODS, **kwargs: Any) -> tuple[Any, dict[str, ContinualResult]]:
    """Run several methods on the same sequence; returns ``(summary DataFrame, {method: result})``.

    NCFT is read off the W-NCFT run when both are asked for (same training, unmerged scores).

    Example:
        >>> table, results = compare_methods(model, [t1, t2], steps=30, lr=1e-3)   # doctest: +SKIP
    """
    import pandas as pd

    results: dict[str, ContinualResult] = {}
    for method in methods:
        if method == "ncft" and "w-ncft" in methods:
            continue
        results[method] = continual_learning(model, tasks, method=method, **kwargs)  # type: ignore[arg-type]
        if method == "w-ncft" and "ncft" in methods:
            results["ncft"] = results[method].as_ncft()
    ordered = {m: results[m] for m in methods}
    return pd.DataFrame([r.summary() for r in ordered.values()]), ordered
