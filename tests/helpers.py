"""Shared test helpers: one tiny task suite and checks that a model was left exactly as it was."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from tl_taskmap.models import as_adapter, hook_point_hook_counts, parameter_fingerprint
from tl_taskmap.tasks import Task, TaskSuite

PROMPTS = ["the quick brown fox", "a b c", "good movie great", "0 1 2 + 3 =", "bad review", "Question: yes or no",
           "the lazy dog", "x y z"]


def tiny_tasks() -> TaskSuite:
    """Two small multiple-choice tasks in two clusters (8 and 6 examples; prompts of different lengths)."""
    sentiment = Task.from_lists("sentiment", PROMPTS, [[" good", " bad"][i % 2] for i in range(8)], options=[" good", " bad"],
                                cluster="sentiment")
    qa = Task.from_lists("qa", PROMPTS[::-1][:6], [[" yes", " no", " maybe"][i % 3] for i in range(6)],
                         options=[" yes", " no", " maybe"], cluster="qa")
    return TaskSuite([sentiment, qa])


def model_state(model: Any) -> dict[str, Any]:
    """Everything a tl_taskmap call must leave unchanged: parameter bytes, hooks, train/eval modes, grad flags."""
    net = as_adapter(model).model
    return {
        "params": parameter_fingerprint(model),
        "hooks": hook_point_hook_counts(model),
        "tl_hooks": {n: (len(hp.fwd_hooks), len(hp.bwd_hooks)) for n, hp in net.hook_dict.items()},
        "context_level": getattr(net, "context_level", 0),
        "training": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
    }


@contextlib.contextmanager
def assert_model_unchanged(model: Any) -> Iterator[None]:
    """Fail if the block changes the model's parameters (bit for bit), hooks, context level, modes or grad flags.

    Example:
        with assert_model_unchanged(model):
            relevance(model, task)
    """
    before = model_state(model)
    yield
    after = model_state(model)
    changed = [key for key in before if before[key] != after[key]]
    assert not changed, f"the model changed: {changed}"


def assert_ablation_restores_on_every_exit(model: Any, units: Any, mode: str, means: Any, adapter: Any, batch: Any, base: Any) -> None:
    """Inside ``ablate(model, units, mode)`` the model is changed (hooks, or parameters for ``"params"``); after a normal
    exit, an exception or a KeyboardInterrupt it is restored exactly (parameters, hooks, the logits of ``batch``)."""
    import torch

    from tl_taskmap.neurons.ablation import ablate

    fingerprint, hooks = parameter_fingerprint(model), hook_point_hook_counts(model)
    for raised in (None, RuntimeError, KeyboardInterrupt):
        try:
            with ablate(model, units, mode, mean_activations=means):
                with torch.no_grad():
                    changed = adapter.forward(batch)
                if mode == "params":
                    assert parameter_fingerprint(model) != fingerprint
                else:
                    assert hook_point_hook_counts(model) != hooks
                if raised is not None:
                    raise raised("stop")
        except (RuntimeError, KeyboardInterrupt) as err:
            assert type(err) is raised
        assert not torch.allclose(changed, base)
        assert parameter_fingerprint(model) == fingerprint, raised
        assert hook_point_hook_counts(model) == hooks, raised
        with torch.no_grad():
            assert torch.equal(adapter.forward(batch), base)
