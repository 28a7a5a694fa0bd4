"""tl_taskmap's hooks are TransformerLens hooks: listed at their hook points while active, removed by
``model.reset_hooks()``, nesting with the user's ``model.hooks(...)`` contexts (both model classes)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_model_unchanged
from tl_taskmap.activations import capture
from tl_taskmap.hooks import tl_hooks
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.ablation import ablate
from tl_taskmap.neurons.sets import NeuronSet

PROMPTS = ["the quick brown fox", "a b", "good movie great"]


def listed(model, name):
    """The TL handles at a hook point (what a TransformerLens user inspects)."""
    return list(model.hook_dict[name].fwd_hooks)


def logits(model):
    a = as_adapter(model)
    with torch.no_grad():
        return a.forward(a.tokenize(PROMPTS))


def test_ablation_hooks_are_listed_and_reset_hooks_removes_them(any_model):
    a = as_adapter(any_model)
    clean = logits(any_model)
    neurons = NeuronSet(a.n_layers, a.d_mlp, {1: [0, 3, 5], 2: list(range(a.d_mlp))})
    with assert_model_unchanged(any_model):
        with ablate(any_model, neurons) as handle:
            level = any_model.context_level
            for name in handle.hook_names:
                (h,) = listed(any_model, name)
                assert h.context_level == level and not h.is_permanent
            assert listed(any_model, "blocks.0.mlp.hook_post") == []
            ablated = logits(any_model)
            assert not torch.allclose(ablated, clean)
            any_model.reset_hooks()
            assert all(listed(any_model, name) == [] for name in handle.hook_names)
            assert torch.equal(logits(any_model), clean)  # reset_hooks really switched the ablation off
        assert torch.equal(logits(any_model), clean)


def test_ablation_nests_with_the_users_hook_contexts(any_model):
    a = as_adapter(any_model)
    neurons = NeuronSet(a.n_layers, a.d_mlp, {1: [0, 1]})
    name = "blocks.1.mlp.hook_post"
    seen = []
    with assert_model_unchanged(any_model):
        with any_model.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(("outer", float(x[..., 0].abs().sum()))))]):
            with ablate(any_model, neurons):
                with any_model.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(("inner", float(x[..., 0].abs().sum()))))]):
                    assert len(listed(any_model, name)) == 3
                    levels = [h.context_level for h in listed(any_model, name)]
                    assert levels == sorted(levels) and len(set(levels)) == 3
                    logits(any_model)
                assert len(listed(any_model, name)) == 2  # the inner TL context removed only its own hook
            assert len(listed(any_model, name)) == 1  # the ablation removed only its own hook
    # The hook added before the ablation saw neuron 0 live, the one added inside saw it zeroed.
    assert seen[0][0] == "outer" and seen[0][1] > 0 and seen[1] == ("inner", 0.0)


def test_capture_hooks_are_visible_to_the_users_code_while_it_runs(any_model):
    target = "blocks.1.hook_resid_post"
    during = []

    def inspect(x, hook):  # runs inside capture's forward pass, before blocks.1
        during.append([(h.context_level, h.is_permanent) for h in listed(any_model, target)])

    with assert_model_unchanged(any_model):
        with any_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", inspect)]):
            outer = any_model.context_level
            capture(any_model, PROMPTS, [(1, "resid_post")], batch_size=2, progress=False)
            assert any_model.context_level == outer
    assert during == [[(outer + 1, False)]] * 2  # one capture hook per batch, one level above the user's
    assert listed(any_model, target) == []


def test_tl_hooks_checks_every_name_first_and_passes_tl_hook_points(any_model):
    got = []
    with assert_model_unchanged(any_model):
        with pytest.raises(ValueError, match="Closest valid hook names"):
            with tl_hooks(any_model, [("blocks.0.hook_resid_post", lambda x, hook: x), ("blocks.0.hook_resid_pots", lambda x, hook: x)]):
                pass
        with tl_hooks(any_model, [("blocks.0.hook_resid_post", lambda x, hook: got.append(hook.name))],
                      bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: got.append("bwd"))]) as handles:
            assert [n for n, _ in handles] == ["blocks.0.hook_resid_post"] * 2
            assert len(any_model.hook_dict["blocks.0.hook_resid_post"].bwd_hooks) == 1
            a = as_adapter(any_model)
            a.forward(a.tokenize(PROMPTS[:1])).sum().backward()
        any_model.zero_grad(set_to_none=True)
    assert got == ["blocks.0.hook_resid_post", "bwd"]  # the hook sees the name it asked for (bridge aliases too)
