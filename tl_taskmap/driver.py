"""The driver: run models over tasks once and feed every probe.

For each batch of each task, :class:`Driver` tokenizes the prompts once per model (checking that all
models see the same token ids), runs **one forward pass per model** with TransformerLens hooks at the
union of the hook points the probes declared, runs **one backward pass** per model and loss when some
probe needs gradients, and hands every probe one :class:`~tl_taskmap.probes.ProbeBatch`.

When no probe on a model needs logits or gradients, the forward pass stops as soon as the last
needed hook point has fired: no later blocks, no unembedding.

Example:
    >>> from tl_taskmap.driver import run_probes
    >>> from tl_taskmap.probes import ActivationProbe
    >>> from tl_taskmap.stats.probes import CKAProbe, CovarianceProbe
    >>> cka, spectrum, acts = run_probes({"a": model_a, "b": model_b}, suite,
    ...     [CKAProbe(("a", "b")), CovarianceProbe(model="a"), ActivationProbe(model="b")])   # doctest: +SKIP
    >>> cka.result()                                                                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.models import ModelAdapter, PaddingSide, TokenBatch, as_adapter
from tl_taskmap.probes import Probe, ProbeBatch, probes_by_model
from tl_taskmap.tasks import Task, TaskSuite, as_suite

__all__ = ["Driver", "run_probes", "gradient_mode"]

ModelsSpec = Union[Any, Mapping[str, Any]]
TasksSpec = Union[Task, TaskSuite, Sequence[Task], Mapping[str, Task], Sequence[str]]


class _StopForward(Exception):
    """Raised from a hook once every needed hook point has fired (nothing downstream is needed)."""


@contextlib.contextmanager
def gradient_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and grad enabled; every flag restored afterwards, even on errors."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("this probe needs gradients but torch.inference_mode() is active; run it outside that block")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


_UNEMBED_IN = "unembed.hook_in"


def row_unembedding(adapter: ModelAdapter) -> Optional[Callable[[Tensor], Tensor]]:
    """``x [n, d_model] -> logits [n, d_vocab]`` with the model's own unembedding, or None when that would
    not be exact: logits soft-capped or scaled after the unembedding, or hooks at the unembedding."""
    model = adapter.model
    if (getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0:
        return None
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    if any(getattr(hf_config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    points = model.hook_dict
    if _UNEMBED_IN not in points:
        return None
    for name in (_UNEMBED_IN, "unembed.hook_out"):
        if name in points and (points[name].fwd_hooks or points[name]._forward_hooks):
            return None
    unembed = getattr(model, "unembed", None)
    if adapter.backend == "hooked" and isinstance(getattr(unembed, "W_U", None), torch.Tensor):
        w, b = unembed.W_U, getattr(unembed, "b_U", None)
        return (lambda x: x @ w + b) if b is not None else (lambda x: x @ w)
    inner = getattr(unembed, "_original_component", None)
    return inner if isinstance(inner, torch.nn.Linear) else None


def _work_items(tasks: TasksSpec) -> list[tuple[str, str, list[str], Optional[list[str]]]]:
    """``(name, cluster, prompts, targets or None)`` per task; a plain list of prompts is one task ``"prompts"``."""
    if isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, str) for t in tasks):
        return [("prompts", "misc", list(tasks), None)]
    return [(t.name, t.cluster, t.prompts, t.targets) for t in as_suite(tasks)]


def _as_models(models: ModelsSpec) -> dict[str, ModelAdapter]:
    if isinstance(models, Mapping):
        if not models:
            raise ValueError("no models given: pass a model or a mapping name → model")
        return {str(n): as_adapter(m) for n, m in models.items()}
    return {"model": as_adapter(models)}


class Driver:
    """Runs models over batches and feeds probes: one forward (and at most one backward) per model per batch.

    Args:
        models: A model, or ``{name: model}`` (HookedTransformer, TransformerBridge or ModelAdapter).
        probes: The probes to feed (see :mod:`tl_taskmap.probes`).
        batch_size: Examples per forward pass.
        padding_side, prepend_bos, max_length: Tokenization (see ``ModelAdapter.tokenize``).
        include_targets: Append each example's target completion (default: when some probe needs it).
            Site probes reduce over prompt tokens only, so their results do not change with it.
        stop_early: Stop each forward pass once the last needed hook has fired, when nothing needs logits.
        row_logits: When every loss reads the logits at some positions only (the probe defines
            ``logit_positions(batch)`` and ``loss_at(row_logits, rows, cols, batch)``), unembed just those
            rows (exact; off for models that post-process logits or have hooks at the unembedding).

    Attributes:
        n_forward, n_backward: Passes run so far, per model name.

    Example:
        >>> driver = Driver({"a": model_a, "b": model_b}, [CKAProbe(("a", "b"))])   # doctest: +SKIP
        >>> driver.run(suite); driver.n_forward                                     # doctest: +SKIP
        {'a': 4, 'b': 4}
    """

    def __init__(self, models: ModelsSpec, probes: Sequence[Probe], *, batch_size: int = 8, padding_side: PaddingSide = "left",
                 prepend_bos: Optional[bool] = None, max_length: Optional[int] = None, include_targets: Optional[bool] = None,
                 stop_early: bool = True, row_logits: bool = True, progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.adapters = _as_models(models)
        self.probes = list(probes)
        bad = [type(p).__name__ for p in self.probes if not hasattr(p, "update")]
        if bad:
            raise TypeError(f"{bad} are not probes (no update(batch)); see tl_taskmap.probes.Probe")
        self.batch_size, self.padding_side, self.prepend_bos, self.max_length = batch_size, padding_side, prepend_bos, max_length
        self.include_targets = any(p.needs_targets for p in self.probes) if include_targets is None else include_targets
        self.stop_early, self.row_logits, self.progress = stop_early, row_logits, progress
        self.n_forward: dict[str, int] = {}
        self.n_backward: dict[str, int] = {}

    # ------------------------------------------------------------------ tasks
    def run(self, tasks: TasksSpec, *, task_models: Optional[Mapping[str, Mapping[str, Any]]] = None,
            max_examples: Optional[int] = None) -> list[Probe]:
        """Feed every batch of every task to every probe; returns the probes.

        Args:
            tasks: Tasks (their prompts, plus targets when needed) or a list of prompts.
            task_models: Extra models that run on one task only: ``{task name: {model name: model}}``.
            max_examples: Use only the first ``max_examples`` examples of each task.
        """
        work = _work_items(tasks)
        names = [w[0] for w in work]
        extra = {t: _as_models(m) for t, m in (task_models or {}).items()}
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise ValueError(f"task_models names tasks {unknown} that are not among the tasks {names}")
        sizes = {name: min(len(p), max_examples) if max_examples else len(p) for name, _, p, _ in work}
        bar = tqdm(total=sum(math.ceil(n / self.batch_size) for n in sizes.values()), disable=not self.progress,
                   desc="probes", leave=False)
        for name, cluster, prompts, targets in work:
            prompts = prompts[: sizes[name]]
            if not prompts:
                raise ValueError(f"task {name!r} has no examples: give it at least one")
            if self.include_targets and targets is None:
                raise ValueError("some probe needs target completions (e.g. relevance), but only prompts were given: pass Tasks")
            models = {**self.adapters, **extra.get(name, {})}
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                chunk_targets = targets[start : start + self.batch_size] if self.include_targets and targets else None
                try:
                    self.run_batch(chunk, chunk_targets, task=name, cluster=cluster, start=start, models=models)
                except ValueError as err:
                    raise ValueError(str(err) if repr(name) in str(err) else f"task {name!r}: {err}") from None
                bar.update(1)
        bar.close()
        return self.probes

    # ------------------------------------------------------------------ one batch
    def tokenize(self, adapters: Mapping[str, ModelAdapter], prompts: Sequence[str], targets: Optional[Sequence[str]],
                 task: str = "task", start: int = 0) -> dict[str, TokenBatch]:
        """One tokenization per distinct tokenizer; all models must get the same token ids."""
        out: dict[str, TokenBatch] = {}
        done: dict[tuple[int, bool], TokenBatch] = {}
        for name, a in adapters.items():
            key = (id(a.tokenizer), a.default_prepend_bos if self.prepend_bos is None else self.prepend_bos)
            if key not in done:
                done[key] = a.tokenize(prompts, targets, padding_side=self.padding_side, prepend_bos=self.prepend_bos,
                                       max_length=self.max_length)
            out[name] = done[key]
        if len(done) > 1:
            names = list(out)
            ref = out[names[0]]
            for name in names[1:]:
                other = out[name]
                for i in range(len(prompts)):
                    ids_a = ref.tokens[i][ref.attention_mask[i].bool()].tolist()
                    ids_b = other.tokens[i][other.attention_mask[i].bool()].tolist()
                    if ids_a != ids_b:
                        raise ValueError(
                            f"models {names[0]!r} and {name!r} tokenize prompt {start + i} of task {task!r} differently "
                            f"({ids_a[:10]} vs {ids_b[:10]}). CKA compares representations of the same inputs, so all "
                            "models must share one tokenizer (and the same prepend_bos setting).")
        return out

    def run_batch(self, prompts: Union[Sequence[str], TokenBatch, Mapping[str, TokenBatch]], targets: Optional[Sequence[str]] = None,
                  *, task: str = "task", cluster: str = "misc", start: int = 0,
                  models: Optional[Mapping[str, ModelAdapter]] = None) -> ProbeBatch:
        """One step: tokenize (unless given a TokenBatch), one forward per model, backward if needed, update every probe."""
        adapters = dict(self.adapters if models is None else models)
        if isinstance(prompts, TokenBatch):
            batches = {name: prompts for name in adapters}
        elif isinstance(prompts, Mapping):
            batches = dict(prompts)
        else:
            batches = self.tokenize(adapters, list(prompts), targets, task, start)
        acts: dict[str, dict[str, Tensor]] = {}
        grads: dict[tuple[str, Any], dict[str, Tensor]] = {}
        logits: dict[str, Tensor] = {}
        losses: dict[tuple[str, Any], Tensor] = {}
        users: dict[str, dict[int, list[str]]] = {}
        for name, adapter in adapters.items():
            users[name] = probes_by_model(self.probes, name, adapter)
            if users[name]:
                self._run_model(name, adapter, batches[name], users[name], acts, grads, logits, losses)
        tokens = next(iter(batches.values())).to("cpu")
        last: Optional[ProbeBatch] = None
        for i, probe in enumerate(self.probes):
            mine = [name for name in adapters if i in users[name]]
            if not mine:
                continue
            key = getattr(probe, "loss_key", None)
            view = ProbeBatch(
                task=task, start=start, tokens=tokens, cluster=cluster,
                acts={m: {h: acts[m][h] for h in users[m][i]} for m in mine},
                grads={m: {h: grads[(m, key)][h] for h in users[m][i]} for m in mine if probe.needs_grad},
                logits={m: logits[m] for m in mine if m in logits},
                losses={m: losses[(m, key)] for m in mine if (m, key) in losses},
            )
            probe.update(view)
            last = view
        return last if last is not None else ProbeBatch(task, start, tokens, {})

    def _run_model(self, name: str, adapter: ModelAdapter, batch: TokenBatch, users: dict[int, list[str]],
                   acts: dict, grads: dict, logits: dict, losses: dict) -> None:
        probes = self.probes
        hooks = list(dict.fromkeys(h for names in users.values() for h in names))
        grad_groups: dict[Any, list[int]] = {}
        for i in users:
            if probes[i].needs_grad:
                grad_groups.setdefault(getattr(probes[i], "loss_key", None), []).append(i)
        grad_hooks = {h for group in grad_groups.values() for i in group for h in users[i]}
        # Losses that read the logits at a few positions only (e.g. the answer tokens) get them from the
        # unembedding of those rows: the forward stops before the unembedding, the backward skips it.
        unembed = None
        if (self.row_logits and grad_groups and not any(probes[i].needs_logits for i in users)
                and all(callable(getattr(probes[g[0]], "logit_positions", None)) for g in grad_groups.values())):
            unembed = row_unembedding(adapter) if _UNEMBED_IN not in hooks else None
        if unembed is not None and _UNEMBED_IN not in hooks:
            hooks.append(_UNEMBED_IN)
            grad_hooks.add(_UNEMBED_IN)
        want_logits = unembed is None and (bool(grad_groups) or any(probes[i].needs_logits for i in users))
        stop = self.stop_early and not want_logits and bool(hooks)
        store: dict[str, Tensor] = {}

        def make_hook(hook_name: str) -> Any:
            def hook(act: Tensor, hook: Any) -> Optional[Tensor]:
                if hook_name in store:
                    raise RuntimeError(f"{hook_name} fired twice in one forward pass; probes need each hook point once")
                out = None
                if hook_name in grad_hooks:
                    if not act.requires_grad:  # frozen parameters: the graph starts here
                        act = act.detach().requires_grad_(True)
                    # Handed back even when unchanged: on the bridge, the tensor attn.hook_z sees stays in
                    # the graph of the loss only when the hook returns it.
                    out = act
                store[hook_name] = act
                if stop and len(store) == len(hooks):
                    raise _StopForward
                return out

            return hook

        batch = batch.to(adapter.device)
        mode = gradient_mode(adapter.model) if grad_groups else torch.no_grad()
        with mode, adapter.hooks([(h, make_hook(h)) for h in hooks]):
            try:
                out = adapter.forward(batch)
            except _StopForward:
                out = None
            self.n_forward[name] = self.n_forward.get(name, 0) + 1
            missing = [h for h in hooks if h not in store]
            if missing:
                raise RuntimeError(f"hooks {missing[:3]} never fired during the forward pass of {name!r}; this architecture may not run them")
            if out is not None and want_logits:
                logits[name] = out.detach()
            for g, (key, group) in enumerate(grad_groups.items()):
                if unembed is None:
                    loss = probes[group[0]].loss(out, batch)
                else:
                    rows, cols = probes[group[0]].logit_positions(batch).to(store[_UNEMBED_IN].device).nonzero(as_tuple=True)
                    loss = probes[group[0]].loss_at(unembed(store[_UNEMBED_IN][rows, cols]), rows, cols, batch)
                losses[(name, key)] = loss.detach()
                wanted = list(dict.fromkeys(h for i in group for h in users[i]))
                got = torch.autograd.grad(loss.sum(), [store[h] for h in wanted], allow_unused=True,
                                          retain_graph=g < len(grad_groups) - 1)
                self.n_backward[name] = self.n_backward.get(name, 0) + 1
                grads[(name, key)] = {h: (torch.zeros_like(store[h]) if gr is None else gr) for h, gr in zip(wanted, got)}
        store.pop(_UNEMBED_IN, None) if unembed is not None else None
        acts[name] = {h: t.detach() for h, t in store.items()}


def run_probes(models: ModelsSpec, tasks: TasksSpec, probes: Sequence[Probe], *, batch_size: int = 8,
               task_models: Optional[Mapping[str, Mapping[str, Any]]] = None, max_examples: Optional[int] = None,
               **options: Any) -> list[Probe]:
    """Run ``models`` over ``tasks`` once and feed every probe; returns the probes (read ``.result()``).

    ``options`` go to :class:`Driver` (``padding_side``, ``prepend_bos``, ``include_targets``, ``progress``, ...).

    Example:
        >>> cka, rel, mine = run_probes({"a": a, "b": b}, suite, [CKAProbe(("a", "b")), RelevanceProbe(model="a"), MyProbe()])  # doctest: +SKIP
    """
    return Driver(models, probes, batch_size=batch_size, **options).run(tasks, task_models=task_models, max_examples=max_examples)
