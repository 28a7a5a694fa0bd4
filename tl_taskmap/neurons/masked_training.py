"""Neuron-restricted fine-tuning (Leng & Xiong 2024, "Train-Task" vs "Train-Random"), full fine-tuning,
and per-task control models (Zhao et al. 2024) saved as safetensors.

Only the parameters owned by the neurons of a :class:`~tl_taskmap.neurons.sets.NeuronSet` are trained:
each neuron's input-weight column, gate column (gated MLPs), input bias and output-weight row. Every
other entry stays **bit-identical**. Masking the gradient alone is not enough — AdamW's decoupled weight
decay (and Adam's L2 term) moves entries whose gradient is zero — so the *update* is masked: the
optimizer never sees the model's MLP tensors. It optimizes copies of the trained neurons' slices
(``param.index_select(dim, neurons)``); after ``backward`` their gradients are gathered from the full
gradient, and after each ``step`` they are written back with ``index_copy_``, which writes the trained
slices and nothing else. Parameters outside the set's MLP tensors have ``requires_grad=False``. As a
side benefit the optimizer state and step cost scale with the set, not with the MLP.

Example:
    >>> from tl_taskmap.neurons.masked_training import finetune
    >>> result = finetune(model, train_task, task_neurons, steps=30, lr=1e-3)            # doctest: +SKIP
    >>> baseline = finetune(other_copy, train_task, task_neurons.random_like(seed=0), steps=30, lr=1e-3)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Literal, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_taskmap.evaluate import answer_nll, answer_window_forward
from tl_taskmap.models import as_adapter, parameter_fingerprint
from tl_taskmap.neurons.low_rank import LowRank, low_rank_adapters, low_rank_targets
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task
from tl_taskmap.state_io import FORMAT_VERSIONS

CONTROL_FORMAT_VERSION = FORMAT_VERSIONS["control_model"]
#: What to train: a NeuronSet (its neurons), ``"all"``/None (every parameter) or :class:`LowRank` adapters.
NeuronSpec = Union[NeuronSet, None, Literal["all"], LowRank]
OptimizerSpec = Union[str, Callable[..., torch.optim.Optimizer]]


@dataclass
class _NeuronSlices:
    param: torch.nn.Parameter  # a model tensor, partly trained
    dim: int  # its neuron axis
    index: Tensor  # the trained neurons
    slices: Tensor  # what the optimizer updates: param.index_select(dim, index), a leaf tensor


class UpdateMask:
    """What :func:`trainable_neurons` hands to a training loop.

    Attributes:
        params: The tensors to give the optimizer: the model's parameters for full fine-tuning, copies
            of the trained neurons' slices for a NeuronSet.
        n_trainable: Number of scalar entries that may change.
        n_neurons: Number of neurons trained (None for full fine-tuning).
    """

    def __init__(self, params: list[Tensor], sliced: list[_NeuronSlices], n_neurons: Optional[int]):
        self.params = params
        self._sliced = sliced
        self.n_neurons = n_neurons
        self.n_trainable = sum(p.numel() for p in params)

    def gather_gradients(self) -> None:
        """Move the trained slices' gradients from the model tensors to ``params`` (after ``backward``)."""
        for s in self._sliced:
            grad = s.param.grad
            s.slices.grad = None if grad is None else grad.index_select(s.dim, s.index)
            s.param.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Write the updated slices into the model (after ``optimizer.step()``); nothing else is written."""
        for s in self._sliced:
            s.param.index_copy_(s.dim, s.index, s.slices)


@contextlib.contextmanager
def trainable_neurons(model: Any, neurons: NeuronSpec = "all") -> Iterator[UpdateMask]:
    """Make only ``neurons``' parameters trainable inside a ``with`` block; restore the flags after.

    Inside the block, every parameter outside the MLP tensors of the set's layers has
    ``requires_grad=False``, and the optimizer gets slice copies (see the module docstring), so entries
    outside the set cannot change whatever the optimizer does. On exit (also on an exception) the
    ``requires_grad`` flags and ``.grad`` of every parameter are put back as they were.

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter.
        neurons: A NeuronSet, or ``"all"`` / ``None`` for every parameter of the model.

    Raises:
        ValueError: empty set, or a set built for another model shape (names the layer and size).

    Example:
        >>> with trainable_neurons(model, task_neurons) as mask:          # doctest: +SKIP
        ...     opt = torch.optim.AdamW(mask.params, lr=1e-3, weight_decay=0.1)
        ...     loss.backward(); mask.gather_gradients(); opt.step(); mask.write_back()
    """
    adapter = as_adapter(model)
    named = list(adapter.model.named_parameters())
    sliced: list[_NeuronSlices] = []
    if neurons is None or (isinstance(neurons, str) and neurons == "all"):
        params: list[Tensor] = [p for _, p in named]
        n_neurons = None
    elif isinstance(neurons, NeuronSet):
        _check_neurons(adapter, neurons)
        for layer in neurons.layers():
            for np_ in adapter.neuron_params(layer):
                index = neurons.indices(layer).to(np_.param.device)
                sliced.append(_NeuronSlices(np_.param, np_.dim, index, np_.param.detach().index_select(np_.dim, index)))
        params = [s.slices for s in sliced]
        n_neurons = len(neurons)
    else:
        raise TypeError(f"neurons must be a NeuronSet, 'all' or None, got {neurons!r}")
    flags = [(p, p.requires_grad, p.grad) for _, p in named]
    trained = {id(p) for p in params} | {id(s.param) for s in sliced}
    try:
        for _, p in named:
            p.requires_grad_(id(p) in trained)
            p.grad = None  # a user's stale gradient must not leak into the first step
        yield UpdateMask(params, sliced, n_neurons)
    finally:
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _check_neurons(adapter: Any, neurons: NeuronSet) -> None:
    if adapter.d_mlp is None:
        raise ValueError("the model has no MLP neurons (cfg.d_mlp is unset): neuron-restricted training needs an MLP")
    neurons.check_compatible(adapter.n_layers, adapter.d_mlp)
    if len(neurons) == 0:
        raise ValueError(
            "the NeuronSet is empty: there is nothing to train. Select neurons first (e.g. relevance(...).top(0.1)) "
            "or pass neurons='all' for full fine-tuning"
        )


@dataclass
class FinetuneResult:
    """The record of one fine-tuning run.

    Attributes:
        task: Name of the training task.
        losses: Mean answer NLL of each step's batch, before that step's update.
        n_trainable: Scalar parameter entries that were allowed to change.
        n_neurons: Neurons trained (None for full fine-tuning).
        config: The settings used (steps, lr, batch_size, weight_decay, seed, optimizer, ...).
        seconds: Wall-clock training time.
    """

    task: str
    losses: list[float]
    n_trainable: int
    n_neurons: Optional[int]
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last ``min(5, steps)`` steps (less noisy than the last step alone)."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "losses": self.losses, "n_trainable": self.n_trainable, "n_neurons": self.n_neurons,
                "config": self.config, "seconds": self.seconds}

    def to_dataframe(self) -> Any:
        """One row per step: ``step``, ``loss``."""
        import pandas as pd

        return pd.DataFrame({"step": range(len(self.losses)), "loss": self.losses})

    def __repr__(self) -> str:
        trained = self.config.get("neurons")
        what = (f"{self.n_neurons} neurons" if self.n_neurons is not None
                else trained if isinstance(trained, str) and trained.startswith("LoRA") else "all parameters")
        return (f"FinetuneResult({self.task!r}: {what}, {self.n_trainable:,} trainable entries, {len(self.losses)} steps, "
                f"loss {self.losses[0]:.3f} -> {self.final_loss:.3f}, {self.seconds:.1f}s)")


def _make_optimizer(spec: OptimizerSpec, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if callable(spec):
        return spec(params, lr=lr, weight_decay=weight_decay)
    options = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if spec not in options:
        raise ValueError(f"optimizer must be one of {sorted(options)} or a callable(params, lr, weight_decay), got {spec!r}")
    if spec in ("adamw", "adam"):
        try:  # the fused kernel is ~3x faster on CPU; fall back where a device or dtype lacks it
            return options[spec](params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return options[spec](params, lr=lr, weight_decay=weight_decay)


def finetune(
    model: Any,
    task: Task,
    neurons: NeuronSpec = "all",
    *,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: OptimizerSpec = "adamw",
    max_grad_norm: Optional[float] = 1.0,
    dropout: bool = False,
    prepend_bos: Optional[bool] = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``task``'s answer tokens, training only ``neurons``.

    The loss is the mean answer-token NLL (:func:`tl_taskmap.evaluate.answer_nll`) of the target
    completion; prompt tokens are not trained on. Batches are drawn from a seeded permutation of the
    examples (reshuffled each epoch), so two runs with the same seed give bit-identical parameters.

    Args:
        model: HookedTransformer, TransformerBridge or ModelAdapter; changed in place.
        task: The training examples (use ``task.split(...)`` to keep an evaluation split apart).
        neurons: A NeuronSet (only its neurons' parameters train; the rest stays bit-identical),
            or ``"all"`` / ``None`` for full fine-tuning, or :class:`~tl_taskmap.neurons.low_rank.LowRank`
            adapters (merged into the weights at the end). Random baseline: ``neurons.random_like(seed)``.
        steps: Optimizer steps. lr: learning rate. batch_size: examples per step.
        weight_decay: Passed to the optimizer; it cannot move frozen entries (see module docstring).
        seed: Seeds batch order and (with ``dropout=True``) dropout; the global RNG state is untouched.
        optimizer: ``"adamw"`` (default), ``"adam"``, ``"sgd"`` or ``callable(params, lr=, weight_decay=)``.
        max_grad_norm: Gradient clipping over trained entries (None: off).
        dropout: Train in ``model.train()`` mode (dropout on); default eval mode, deterministic and
            closest to the model at evaluation time. The original mode is restored either way.
        progress: Show a tqdm bar with the running loss.

    Example:
        >>> res = finetune(model, task, NeuronSet(2, 8, {0: [1, 5]}), steps=10, lr=1e-3, progress=False)  # doctest: +SKIP
        >>> res.n_neurons, len(res.losses)                                                              # doctest: +SKIP
        (2, 10)
    """
    for value, what in ((steps, "steps"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not isinstance(task, Task):
        raise TypeError(f"task must be a tl_taskmap Task, got {type(task).__name__}")
    adapter = as_adapter(model)
    net = adapter.model
    device = adapter.device
    config = {"steps": steps, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
              "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
              "max_grad_norm": max_grad_norm, "dropout": dropout,
              "neurons": ({"name": neurons.name, "size": len(neurons)} if isinstance(neurons, NeuronSet)
                          else neurons.describe() if isinstance(neurons, LowRank) else "all")}
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    was_training = net.training
    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    plan = low_rank_adapters(adapter, neurons) if isinstance(neurons, LowRank) else trainable_neurons(adapter, neurons)
    with plan as mask, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        opt = _make_optimizer(optimizer, mask.params, lr, weight_decay)
        net.train(dropout)
        try:
            bar = tqdm(range(steps), disable=not progress, desc=f"finetune {task.name}", leave=False)
            for step in bar:
                if len(order) < batch_size:  # next epoch(s): the seeded permutation decides the order
                    while len(order) < batch_size:
                        order.extend(torch.randperm(len(task), generator=generator).tolist())
                chosen, order = order[:batch_size], order[batch_size:]
                examples = [task.examples[i] for i in chosen]
                batch = adapter.tokenize([e.prompt for e in examples], [e.target for e in examples], prepend_bos=prepend_bos)
                # Unembed only the answer columns: same loss and gradients, no [batch, pos, d_vocab] logits to keep for backward.
                loss = answer_nll(*answer_window_forward(adapter, batch)).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss at step {step} on {task.name!r}: lower lr (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                mask.gather_gradients()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(mask.params, max_grad_norm)
                opt.step()
                mask.write_back()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            net.train(was_training)
            opt.zero_grad(set_to_none=True)
    return FinetuneResult(task.name, losses, mask.n_trainable, mask.n_neurons, config, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- control models


def copy_model(model: Any, *, share_except: Optional[Collection[str]] = None) -> Any:
    """A deep copy of the model's network, safe on a TransformerLens 4.3 bridge that was trained before.

    With ``share_except`` (parameter names), the copy is a full model object of its own (modules, hook
    points, buffers) whose parameters are the *same tensors* as ``model``'s, except the named ones,
    which are copied. That is what a control model that changes only a few tensors needs: a LoRA
    control of SmolLM2 costs 53 MB instead of 538 MB. Training the copy's shared parameters would
    change ``model`` too, so only ever train the named ones (:func:`train_control_model` does).

    A deep-copied TransformerBridge keeps the original's ``ln1`` pre-hook closures, which write the pre-LN
    residual onto the *original* model's attention bridges; after training a copy, that value holds an
    autograd graph and ``copy.deepcopy`` fails. The bridge clears this transient value itself after every
    block's forward, so clearing it first is the same operation. Likewise any cached tensor attribute that
    still holds an autograd graph (the attention bridge's last ``_pattern``) is detached first.

    Example:
        >>> twin = copy_model(model)   # doctest: +SKIP
        >>> light = copy_model(model, share_except=low_rank_targets(model))   # doctest: +SKIP
    """
    net = as_adapter(model).model
    for module in net.modules():
        if getattr(module, "_captured_pre_ln_residual", None) is not None:
            module._captured_pre_ln_residual = None
        for key, value in list(vars(module).items()):  # e.g. a cached attention ``_pattern`` from a training step
            if isinstance(value, Tensor) and value.grad_fn is not None:
                setattr(module, key, value.detach())
    memo: dict[int, Any] = {}
    if share_except is not None:
        own = set(share_except)
        unknown = sorted(own - {n for n, _ in net.named_parameters()})
        if unknown:
            raise ValueError(f"share_except names {unknown[:3]}, which are not parameters of the model")
        memo = {id(p): p for n, p in net.named_parameters() if n not in own}
        memo.update({id(b): b for _, b in net.named_buffers()})
    return copy.deepcopy(net, memo)


def trained_parameter_names(model: Any, neurons: NeuronSpec) -> list[str]:
    """Names of the parameters that :func:`finetune` with ``neurons`` may change.

    Example:
        >>> trained_parameter_names(model, LowRank())[:1]   # doctest: +SKIP
        ['blocks.0.attn.W_Q']
    """
    adapter = as_adapter(model)
    if isinstance(neurons, LowRank):
        return low_rank_targets(adapter, neurons.targets)
    named = list(adapter.model.named_parameters())
    if isinstance(neurons, NeuronSet):
        ids = {id(np_.param) for layer in neurons.layers() for np_ in adapter.neuron_params(layer)}
        return [n for n, p in named if id(p) in ids]
    return [n for n, _ in named]


def train_control_model(base_model: Any, task: Task, *, neurons: NeuronSpec = None, return_result: bool = False,
                        share_weights: bool = False, **finetune_kwargs: Any) -> Any:
    """A copy of ``base_model`` fine-tuned on one task: the per-task control model C_t.

    ``neurons=None`` (default) is full fine-tuning; a NeuronSet restricts training to it;
    ``LowRank()`` trains LoRA adapters on the query and value projections, as the paper's control
    models were trained. The base model is never changed. Keyword arguments go to :func:`finetune`.

    Args:
        share_weights: The control shares every tensor it does not train with ``base_model``
            (:func:`copy_model` ``share_except``): a LoRA control then costs a tenth of a copy. Do not
            train the returned model further or change the base while it is in use.

    Returns:
        The fine-tuned copy, or ``(copy, FinetuneResult)`` with ``return_result=True``.

    Example:
        >>> control = train_control_model(model, suite["sst2"], steps=30, lr=1e-4)   # doctest: +SKIP
        >>> light = train_control_model(model, suite["sst2"], neurons=LowRank(), share_weights=True, lr=2e-3)  # doctest: +SKIP
    """
    own = trained_parameter_names(base_model, neurons) if share_weights else None
    copy_ = copy_model(base_model, share_except=own)
    result = finetune(copy_, task, neurons, **finetune_kwargs)
    return (copy_, result) if return_result else copy_


def shuffled_answers(task: Task, seed: int = 0) -> Task:
    """``task`` with its answers permuted across examples: the training data of a *null control*.

    Prompts stay in place; example ``i`` gets the answer of example ``perm[i]`` (a seeded permutation),
    so the answer distribution is unchanged but no longer depends on the prompt. For multiple choice
    the permuted *label* (option index, modulo this example's option count) is used, so every target
    stays among its example's options.

    Example:
        >>> from tl_taskmap.tasks import Task
        >>> t = Task.from_lists("t", ["a", "b", "c", "d"], [" x", " y", " x", " y"], options=[" x", " y"])
        >>> sorted(shuffled_answers(t, seed=1).targets) == sorted(t.targets)
        True
    """
    from dataclasses import replace

    from tl_taskmap.tasks import Example

    perm = torch.randperm(len(task), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = []
    for example, source in zip(task.examples, (task.examples[j] for j in perm)):
        if example.options:
            label = source.label if source.label is not None else 0
            examples.append(Example(example.prompt, example.options[label % len(example.options)], example.options))
        else:
            examples.append(Example(example.prompt, source.target, None))
    return replace(task, name=f"{task.name} (shuffled answers)", examples=examples,
                   meta={**task.meta, "shuffled_answers_seed": seed})


def train_null_control_model(base_model: Any, task: Task, *, shuffle_seed: int = 0, neurons: NeuronSpec = None,
                             return_result: bool = False, share_weights: bool = False, **finetune_kwargs: Any) -> Any:
    """A *null control*: :func:`train_control_model` on ``task``'s prompts with shuffled answers.

    Same fine-tuning as the task control (pass the same keyword arguments), but the answers carry no
    information about the prompts (:func:`shuffled_answers`), so whatever it changes in the model is what
    any fine-tune of this length on these prompts changes. The base model is never changed.

    Example:
        >>> null = train_null_control_model(model, suite["sst2"], steps=30, lr=1e-4)   # doctest: +SKIP
    """
    return train_control_model(base_model, shuffled_answers(task, shuffle_seed), neurons=neurons,
                               return_result=return_result, share_weights=share_weights, **finetune_kwargs)


def _combined_fingerprint(model: Any) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(parameter_fingerprint(model).items()):
        digest.update(name.encode() + b"\0" + value)
    return digest.hexdigest()


def _describe(model: Any) -> dict[str, Any]:
    adapter = as_adapter(model)
    inner = type(getattr(adapter.model, "original_model", adapter.model)).__name__
    return {"backend": adapter.backend, "class": inner, "n_layers": adapter.n_layers, "d_model": adapter.d_model, "d_mlp": adapter.d_mlp}


def save_control_model(model: Any, path: str | os.PathLike, *, base_model: Any = None, task: Optional[str] = None,
                       meta: Optional[dict[str, Any]] = None) -> Path:
    """Save a control model to the folder ``path``: ``weights.safetensors`` + ``manifest.json`` (no pickle).

    With ``base_model``, only the parameters whose bytes differ from the base's are written (a delta; a
    neuron-restricted model stores just its touched MLP tensors) and the manifest records a fingerprint
    of the base so loading onto the wrong base fails. Without it, every parameter is written. Tensors are
    keyed by ``model.named_parameters()`` names, so a file loads onto the same model class only.

    Example:
        >>> save_control_model(control, "controls/sst2", base_model=model, task="sst2")   # doctest: +SKIP
        >>> control2 = load_control_model(model, "controls/sst2")                          # doctest: +SKIP
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    net = as_adapter(model).model
    params = dict(net.named_parameters())
    names = sorted(params)
    delta = base_model is not None
    manifest: dict[str, Any] = {"format_version": CONTROL_FORMAT_VERSION, "kind": "tl_taskmap.control_model",
                                "model": _describe(model), "task": task, "meta": json.loads(json.dumps(meta or {})),
                                "delta": delta, "base_fingerprint": None}
    if delta:
        base_prints = parameter_fingerprint(base_model)
        if set(base_prints) != set(params):
            raise ValueError("base_model's parameters are not the control model's: save a delta only against its own base")
        mine = parameter_fingerprint(model)
        names = [n for n in names if mine[n] != base_prints[n]]
        manifest["base_fingerprint"] = _combined_fingerprint(base_model)
    manifest["tensors"] = {n: {"shape": list(params[n].shape), "dtype": str(params[n].dtype)} for n in names}
    save_file({n: params[n].detach().cpu().contiguous().clone() for n in names}, str(folder / "weights.safetensors"))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def load_control_model(base_model: Any, path: str | os.PathLike, *, check_base: bool = True, share_weights: bool = False) -> Any:
    """Rebuild a saved control model: a deep copy of ``base_model`` with the saved tensors copied in.

    With ``share_weights`` and a delta save, the copy shares every tensor the file does not hold with
    ``base_model`` (:func:`copy_model` ``share_except``): memory for the saved tensors only.

    Raises:
        ValueError: missing files, an unknown format version, another model class or shape, a
            tensor name or shape that does not fit, or (for a delta, with ``check_base``) a base
            model other than the one it was saved against.

    Example:
        >>> control = load_control_model(model, "controls/sst2")   # doctest: +SKIP
    """
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / "manifest.json").is_file() or not (folder / "weights.safetensors").is_file():
        raise ValueError(f"{folder} is not a saved control model (needs manifest.json and weights.safetensors)")
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("kind") != "tl_taskmap.control_model" or manifest.get("format_version") != CONTROL_FORMAT_VERSION:
        raise ValueError(f"{folder}: format {manifest.get('kind')!r} v{manifest.get('format_version')!r}; "
                         f"this tl_taskmap reads tl_taskmap.control_model v{CONTROL_FORMAT_VERSION}")
    if manifest["model"] != _describe(base_model):
        raise ValueError(f"{folder} was saved from {manifest['model']} but the base model is {_describe(base_model)}")
    if manifest["delta"] and check_base and manifest["base_fingerprint"] != _combined_fingerprint(base_model):
        raise ValueError(f"{folder} stores only the tensors that differ from its base, and this base_model is not that base "
                         "(its weights differ); pass the original base or check_base=False")
    tensors = load_file(str(folder / "weights.safetensors"))
    model = copy_model(base_model, share_except=list(tensors) if share_weights and manifest["delta"] else None)
    params = dict(model.named_parameters())
    if not manifest["delta"] and set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        raise ValueError(f"{folder} is a full save but lacks parameters such as {missing}")
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params:
                raise ValueError(f"{folder}: tensor {name!r} is not a parameter of the base model")
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, the model's is {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    return model


__all__ = ["FinetuneResult", "UpdateMask", "trainable_neurons", "finetune", "train_control_model", "trained_parameter_names", "LowRank",
           "shuffled_answers", "train_null_control_model", "copy_model",
           "save_control_model", "load_control_model", "CONTROL_FORMAT_VERSION"]
