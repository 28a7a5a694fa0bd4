"""Scoring a model on a task: loss on the answer tokens, and the task's metric.

* **loss**: mean negative log-likelihood of the target completion's tokens given the prompt
  (prompt tokens are masked out), averaged over examples.
* **accuracy** (multiple choice): each option is scored by its log-likelihood after the prompt
  (``scoring="mean"`` per token, the default, or ``"sum"``); the best-scoring option is the answer.
* **exact_match** / **rouge_l** (generation): greedy decoding until a newline or EOS, compared with the
  target after stripping whitespace; ROUGE-L is the LCS-based F1 over whitespace tokens.

Example:
    >>> from tl_taskmap.evaluate import evaluate_task
    >>> score = evaluate_task(model, task)      # doctest: +SKIP
    >>> score.metric_value, score.loss            # doctest: +SKIP
    (0.74, 0.61)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.choice_scoring import option_logprob_sums
from tl_taskmap.generation import greedy_token_ids, target_logprobs_and_greedy
from tl_taskmap.kv_cache import KVCacheUnsupported
from tl_taskmap.models import ModelAdapter, PaddingSide, TokenBatch, as_adapter
from tl_taskmap.tasks import Task, TaskSuite, as_suite

Scoring = Literal["mean", "sum"]


def answer_token_logprobs(logits: Float[Tensor, "batch pos d_vocab"], batch: TokenBatch) -> Float[Tensor, "batch pos"]:
    """Log-probability of each target token given what precedes it (0 where the token is not a target).

    Position ``t`` holds ``log p(tokens[t] | tokens[:t])``, read from the logits at ``t - 1``. The
    float32 log-softmax runs only at the positions that predict a target token (not over the whole
    vocabulary at every position), which keeps memory at O(answer tokens x vocabulary).
    """
    batch = batch.to(logits.device)
    predicts_target = batch.target_mask[:, 1:]
    picked = F.log_softmax(logits[:, :-1][predicts_target].float(), dim=-1).gather(-1, batch.tokens[:, 1:][predicts_target][:, None]).squeeze(-1)
    out = torch.zeros(batch.tokens.shape, dtype=picked.dtype, device=logits.device)
    out[:, 1:][predicts_target] = picked
    return out


def answer_nll(
    logits: Float[Tensor, "batch pos d_vocab"], batch: TokenBatch, *, reduction: Scoring = "mean"
) -> Float[Tensor, " batch"]:
    """Per-example negative log-likelihood of the target tokens (mean or sum over them).

    Raises:
        ValueError: a row has no target tokens (nothing to score: give each prompt a completion).
    """
    n_target = batch.target_mask.sum(1).to(logits.device)
    if bool((n_target == 0).any()):
        rows = torch.nonzero(n_target == 0).flatten().tolist()
        raise ValueError(f"rows {rows[:5]} have no answer tokens: the loss needs a target completion after each prompt")
    total = -answer_token_logprobs(logits, batch).sum(1)
    return total / n_target if reduction == "mean" else total


def answer_window_forward(adapter: ModelAdapter, batch: TokenBatch) -> tuple[Float[Tensor, "batch window d_vocab"], TokenBatch]:
    """Logits of only the trailing columns that hold the answers, with the matching slice of ``batch``.

    ``answer_nll(*answer_window_forward(adapter, batch))`` equals ``answer_nll(adapter.forward(batch), batch)``
    (values and gradients) but unembeds ``max answer length + 1`` columns instead of every position,
    which saves the ``[batch, pos, d_vocab]`` logits and their gradient when training. It needs left
    padding (answers end in the last column); otherwise the full logits are returned with ``batch``.

    Example:
        >>> logits, window = answer_window_forward(adapter, adapter.tokenize(["2+2="], [" 4"]))   # doctest: +SKIP
        >>> answer_nll(logits, window)                                                            # doctest: +SKIP
    """
    from tl_taskmap.kv_cache import _hf_forward_parameters, hooked_unembed

    width = int(batch.target_mask.sum(1).max()) + 1
    if batch.padding_side != "left" or width >= batch.tokens.shape[1]:
        return adapter.forward(batch), batch
    window = TokenBatch(batch.tokens[:, -width:], batch.attention_mask[:, -width:], batch.target_mask[:, -width:], "left")
    if adapter.backend == "hooked":
        on_device = batch.to(adapter.device)
        residual = adapter.model(on_device.tokens, attention_mask=on_device.attention_mask, stop_at_layer=adapter.n_layers)
        return hooked_unembed(adapter.model, residual[:, -width:]), window
    if "logits_to_keep" in _hf_forward_parameters(adapter):
        logits = adapter.forward(batch, logits_to_keep=width)
        if logits.shape[1] == width:
            return logits, window
        return logits, batch
    return adapter.forward(batch), batch


def answer_batches(
    adapter: ModelAdapter,
    task: Task,
    batch_size: int = 8,
    *,
    padding_side: PaddingSide = "left",
    prepend_bos: Optional[bool] = None,
) -> Iterator[TokenBatch]:
    """``(prompt + target)`` batches of a task, with ``target_mask`` on the target tokens."""
    for start in range(0, len(task), batch_size):
        chunk = task.examples[start : start + batch_size]
        yield adapter.tokenize([e.prompt for e in chunk], [e.target for e in chunk], padding_side=padding_side, prepend_bos=prepend_bos)


def task_loss(model: Any, task: Task, *, batch_size: int = 8, prepend_bos: Optional[bool] = None) -> float:
    """Mean per-example answer NLL of ``task`` (no gradients)."""
    adapter = as_adapter(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in answer_batches(adapter, task, batch_size, prepend_bos=prepend_bos):
            total += float(answer_nll(adapter.forward(batch), batch).sum())
            n += len(batch)
    return total / n


@dataclass
class TaskScore:
    """A model's score on one task.

    Attributes:
        task: Task name. metric: the metric's name. metric_value: accuracy / exact match / ROUGE-L in [0, 1].
        loss: mean answer NLL (nats per token). n: examples scored. chance: chance accuracy (or None).
        per_example: the metric per example (1/0 for accuracy and exact match).
        predictions: the predicted option or generated text per example.
        losses: the answer NLL per example (mean over the target's tokens), in task order.
        option_scores: per example, each option's score (negative NLL, mean or sum per ``scoring``;
            higher is better); empty for generation tasks.
    """

    task: str
    metric: str
    metric_value: float
    loss: float
    n: int
    chance: Optional[float] = None
    per_example: list[float] = field(default_factory=list, repr=False)
    predictions: list[str] = field(default_factory=list, repr=False)
    losses: list[float] = field(default_factory=list, repr=False)
    option_scores: list[list[float]] = field(default_factory=list, repr=False)

    def _repr_html_(self) -> str:  # Jupyter: a compact table (and a small figure), see tl_taskmap.display
        from tl_taskmap.display import task_score_html

        return task_score_html(self)

    def __repr__(self) -> str:
        chance = f", chance={self.chance:.3f}" if self.chance is not None else ""
        return f"TaskScore({self.task!r}: {self.metric}={self.metric_value:.3f}, loss={self.loss:.3f}, n={self.n}{chance})"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "metric_value": self.metric_value, "loss": self.loss, "n": self.n, "chance": self.chance}


def evaluate_task(
    model: Any,
    task: Task,
    *,
    batch_size: int = 8,
    scoring: Scoring = "mean",
    max_new_tokens: Optional[int] = None,
    prepend_bos: Optional[bool] = None,
    progress: bool = False,
    fast: bool = True,
) -> TaskScore:
    """Score ``model`` on ``task``: answer loss plus the task's metric.

    For multiple choice, the option scores give both the accuracy and the loss (the target is one of
    the options). Generation tasks take the loss and the greedy output from the same pass.

    With ``fast=True`` (default) each prompt runs once (a token prefix shared by a batch's prompts once
    for the batch, :mod:`tl_taskmap.prompt_cache`) and its key/value cache serves all options
    (:mod:`tl_taskmap.choice_scoring`), or the target's loss and every decoding step
    (:func:`tl_taskmap.generation.target_logprobs_and_greedy`: greedy tokens are read off the target's
    pass while they agree with it); the scores equal the ``fast=False`` reference (one full forward per
    option, no cache) up to float rounding, including under per-token hooks such as ablations.

    Args:
        model: A HookedTransformer, TransformerBridge or ModelAdapter (hooks already on it apply,
            which is how ablations are evaluated).
        task: The task.
        batch_size: Rows per forward pass.
        scoring: ``"mean"`` (per-token, default: options of different lengths compare fairly) or ``"sum"``.
        max_new_tokens: Generation budget (default: longest target + 2 tokens).
        prepend_bos: Prepend BOS (default: the model's setting).
        fast: Score from one cached pass per prompt (default); ``False`` runs the full reference
            forward per option and decodes without a cache.

    Example:
        >>> evaluate_task(model, task)   # doctest: +SKIP
        TaskScore('sst2': accuracy=0.740, loss=0.612, n=50, chance=0.500)
    """
    adapter = as_adapter(model)
    if scoring not in ("mean", "sum"):
        raise ValueError(f"scoring must be 'mean' or 'sum', got {scoring!r}")
    with torch.no_grad():
        if fast:
            try:
                if task.metric == "accuracy":
                    return _evaluate_choice(adapter, task, batch_size, scoring, prepend_bos, progress, _cached_option_nll)
                return _evaluate_generation(adapter, task, batch_size, max_new_tokens, prepend_bos, progress, use_cache=True)
            except KVCacheUnsupported as err:
                warnings.warn(f"{err}; falling back to the uncached evaluation", RuntimeWarning, stacklevel=2)
        if task.metric == "accuracy":
            return _evaluate_choice(adapter, task, batch_size, scoring, prepend_bos, progress, _full_option_nll)
        return _evaluate_generation(adapter, task, batch_size, max_new_tokens, prepend_bos, progress, use_cache=False)


OptionNLL = Callable[[ModelAdapter, Task, int, Optional[bool], bool], "tuple[Tensor, Tensor]"]


def _full_option_nll(adapter: ModelAdapter, task: Task, batch_size: int, prepend_bos: Optional[bool], progress: bool) -> tuple[Tensor, Tensor]:
    """Reference: one full ``prompt + option`` forward per (example, option) row; summed NLL and token counts."""
    rows = [(i, e.prompt, opt) for i, e in enumerate(task.examples) for opt in e.options]  # type: ignore[union-attr]
    sum_nll = torch.empty(len(rows))
    counts = torch.empty(len(rows))
    for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc=f"eval {task.name}", leave=False):
        chunk = rows[start : start + batch_size]
        batch = adapter.tokenize([r[1] for r in chunk], [r[2] for r in chunk], prepend_bos=prepend_bos)
        logits = adapter.forward(batch)
        sum_nll[start : start + len(chunk)] = answer_nll(logits, batch, reduction="sum").cpu()
        counts[start : start + len(chunk)] = batch.target_mask.sum(1).float()
    return sum_nll, counts


def _cached_option_nll(adapter: ModelAdapter, task: Task, batch_size: int, prepend_bos: Optional[bool], progress: bool) -> tuple[Tensor, Tensor]:
    """One cached pass per prompt (``batch_size`` prompts at a time) scores all its options."""
    sums, counts = [], []
    for start in tqdm(range(0, len(task), batch_size), disable=not progress, desc=f"eval {task.name}", leave=False):
        chunk = task.examples[start : start + batch_size]
        logprob_sums, n_tokens = option_logprob_sums(adapter, [e.prompt for e in chunk], [list(e.options or []) for e in chunk], prepend_bos=prepend_bos)
        sums.append(-logprob_sums)
        counts.append(n_tokens.float())
    return torch.cat(sums), torch.cat(counts)


def _evaluate_choice(
    adapter: ModelAdapter, task: Task, batch_size: int, scoring: Scoring, prepend_bos: Optional[bool], progress: bool, option_nll: OptionNLL
) -> TaskScore:
    sum_nll, counts = option_nll(adapter, task, batch_size, prepend_bos, progress)
    mean_nll = sum_nll / counts
    if not torch.isfinite(mean_nll).all():
        raise FloatingPointError(f"non-finite answer loss on task {task.name!r}: check the model's dtype (fp16 overflow?) and weights")
    score = mean_nll if scoring == "mean" else sum_nll
    correct, predictions, losses, option_scores = [], [], [], []
    offset = 0
    for e in task.examples:
        k = len(e.options)  # type: ignore[arg-type]
        choice = int(torch.argmin(score[offset : offset + k]))
        predictions.append(e.options[choice])  # type: ignore[index]
        correct.append(float(choice == e.label))
        losses.append(float(mean_nll[offset + e.label]))  # type: ignore[operator]
        option_scores.append((-score[offset : offset + k]).tolist())
        offset += k
    return TaskScore(task.name, "accuracy", sum(correct) / len(correct), sum(losses) / len(losses), len(task), task.chance, correct,
                     predictions, losses, option_scores)


def _evaluate_generation(
    adapter: ModelAdapter, task: Task, batch_size: int, max_new_tokens: Optional[int], prepend_bos: Optional[bool], progress: bool, *, use_cache: bool
) -> TaskScore:
    if max_new_tokens is None:
        max_new_tokens = max(len(adapter.tokenizer.encode(t, add_special_tokens=False)) for t in task.targets) + 2
    losses: list[float] = []
    generations: list[str] = []
    for start in tqdm(range(0, len(task), batch_size), disable=not progress, desc=f"generate {task.name}", leave=False):
        chunk = task.examples[start : start + batch_size]
        prompts = [e.prompt for e in chunk]
        if use_cache:  # one pass per prompt serves the loss and the greedy output
            logprob_sums, n_tokens, ids = target_logprobs_and_greedy(adapter, prompts, [e.target for e in chunk], max_new_tokens,
                                                                     prepend_bos=prepend_bos)
            losses.extend((-logprob_sums / n_tokens).tolist())
            generations.extend(adapter.tokenizer.decode(row) for row in ids)
        else:
            batch = adapter.tokenize(prompts, [e.target for e in chunk], prepend_bos=prepend_bos)
            losses.extend(answer_nll(adapter.forward(batch), batch).cpu().tolist())
            generations.extend(greedy_generate(adapter, prompts, max_new_tokens, prepend_bos=prepend_bos, use_cache=False))
    scorer = exact_match if task.metric == "exact_match" else rouge_l
    per_example = [scorer(g, e.target) for g, e in zip(generations, task.examples)]
    return TaskScore(task.name, str(task.metric), sum(per_example) / len(per_example), sum(losses) / len(losses), len(task), None, per_example,
                     generations, losses)


def greedy_generate(
    adapter: ModelAdapter, prompts: Sequence[str], max_new_tokens: int, *, prepend_bos: Optional[bool] = None, use_cache: bool = True
) -> list[str]:
    """Greedy continuations, stopping at a newline or EOS (see :func:`tl_taskmap.generation.greedy_token_ids`).

    ``use_cache=True`` (default) decodes with a key/value cache; ``False`` re-runs the padded sequence per token.

    Example:
        >>> greedy_generate(as_adapter(model), ["The capital of France is"], 5)   # doctest: +SKIP
        [' Paris']
    """
    adapter = as_adapter(adapter)
    ids = greedy_token_ids(adapter, prompts, max_new_tokens, prepend_bos=prepend_bos, use_cache=use_cache)
    return [adapter.tokenizer.decode(row) for row in ids]


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the whitespace-stripped, case-folded strings are equal."""
    return float(prediction.strip().casefold() == target.strip().casefold())


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    a, b = prediction.lower().split(), target.lower().split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def evaluate_suite(model: Any, tasks: Task | Sequence[Task] | TaskSuite, **kwargs: Any) -> Any:
    """Score every task; returns a pandas DataFrame (task, cluster, metric, metric_value, loss, n, chance).

    Example:
        >>> evaluate_suite(model, suite)   # doctest: +SKIP
    """
    import pandas as pd

    suite = as_suite(tasks)
    rows = []
    for task in suite:
        row = evaluate_task(model, task, **kwargs).to_dict()
        row["cluster"] = task.cluster
        rows.append(row)
    return pd.DataFrame(rows)[["task", "cluster", "metric", "metric_value", "loss", "n", "chance"]]


def bootstrap_interval(values: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (deterministic for a seed)."""
    if len(values) == 0:
        return (math.nan, math.nan)
    data = torch.tensor(list(values), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (n_boot, len(data)), generator=gen)
    means = data[idx].mean(1)
    return float(torch.quantile(means, alpha / 2)), float(torch.quantile(means, 1 - alpha / 2))
