"""LoRA adapters on q and v (the paper's control models) and controls that share the model's other tensors."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_model_unchanged
from tl_taskmap.models import as_adapter, parameter_fingerprint
from tl_taskmap.neurons.low_rank import LowRank, low_rank_adapters, low_rank_targets
from tl_taskmap.neurons.masked_training import (copy_model, finetune, load_control_model, save_control_model,
                                                 train_control_model, trained_parameter_names)


def _logits(model, tokens):
    with torch.no_grad():
        return as_adapter(model).model(tokens).detach().clone()


def _tokens(model):
    return as_adapter(model).tokenize(["the quick brown fox", "a b c"]).tokens


def test_targets_are_one_query_and_one_value_weight_per_layer(any_model):
    adapter = as_adapter(any_model)
    names = low_rank_targets(any_model)
    assert len(names) == 2 * adapter.n_layers
    stripped = [n.replace("._original_component", "") for n in names]
    assert sum(n.endswith(("W_Q", "q_proj.weight", "attn.q.weight")) for n in stripped) == adapter.n_layers
    assert sum(n.endswith(("W_V", "v_proj.weight", "attn.v.weight")) for n in stripped) == adapter.n_layers
    assert low_rank_targets(any_model, ("k",)) != low_rank_targets(any_model, ("q",))


def test_merge_writes_w_plus_scaled_low_rank_product(any_model):
    """The merged weight equals W + alpha/r * down @ up laid out like W (an independent einsum), and the
    forward inside the block (W + delta through the parametrization) equals the forward after the merge."""
    spec = LowRank(rank=3, alpha=6.0)
    tokens = _tokens(any_model)
    named = dict(as_adapter(any_model).model.named_parameters())
    before = {n: named[n].detach().clone() for n in low_rank_targets(any_model)}
    order = list(named)
    with low_rank_adapters(any_model, spec) as mask:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in mask.params:
                p.copy_(torch.randn_like(p) * 0.3)
        factors = [p.detach().clone() for p in mask.params]
        inside = _logits(any_model, tokens)
    after = _logits(any_model, tokens)
    torch.testing.assert_close(after, inside, atol=1e-5, rtol=1e-5)
    named = dict(as_adapter(any_model).model.named_parameters())
    assert list(named) == order  # the parametrization is gone and the parameter order is as it was
    for i, name in enumerate(low_rank_targets(any_model)):
        down, up = factors[2 * i], factors[2 * i + 1]
        w = before[name]
        if w.ndim == 2:
            expected = w + 2.0 * torch.einsum("ir,rj->ji", down, up)
        else:  # TransformerLens [head, d_model, d_head]
            head, d_model, d_head = w.shape
            expected = w + 2.0 * torch.einsum("ir,rhj->hij", down, up.reshape(-1, head, d_head))
        torch.testing.assert_close(named[name].detach(), expected, atol=1e-6, rtol=1e-6)
        assert not torch.equal(named[name].detach(), w)


def test_an_exception_inside_leaves_the_model_bit_identical(any_model):
    with assert_model_unchanged(any_model):
        with pytest.raises(RuntimeError, match="boom"):
            with low_rank_adapters(any_model) as mask:
                with torch.no_grad():
                    for p in mask.params:
                        p.add_(1.0)
                raise RuntimeError("boom")


def test_finetune_with_adapters_changes_only_q_and_v_and_learns(any_model, tiny_tasks):
    before = parameter_fingerprint(any_model)
    result = finetune(any_model, tiny_tasks["sentiment"], LowRank(), steps=8, lr=2e-2, batch_size=4, progress=False)
    after = parameter_fingerprint(any_model)
    changed = {n for n in after if after[n] != before[n]}
    targets = set(low_rank_targets(any_model))
    assert targets <= changed <= set(_sharing_storage(any_model, targets))  # GPT-2's bridge: the fused qkv sees q and v change
    assert result.n_neurons is None and result.n_trainable == sum(
        LowRank().rank * sum(_factor_sizes(p) for p in [dict(as_adapter(any_model).model.named_parameters())[n]])
        for n in low_rank_targets(any_model))
    assert result.final_loss < result.losses[0]
    assert "LoRA rank 8 on q,v" in repr(result)


def _sharing_storage(model, names):
    """``names`` and every parameter that is a view of the same storage (GPT-2's bridge: q/k/v inside qkv)."""
    named = dict(as_adapter(model).model.named_parameters())
    storages = {named[n].untyped_storage().data_ptr() for n in names}
    return [n for n, p in named.items() if p.untyped_storage().data_ptr() in storages]


def _factor_sizes(weight):
    return sum(weight.shape) if weight.ndim == 2 else weight.shape[1] + weight.shape[0] * weight.shape[2]


def test_shared_weight_control_equals_an_independent_copy_and_leaves_the_base_alone(any_model, tiny_tasks, tmp_path):
    task = tiny_tasks["qa"]
    settings = dict(neurons=LowRank(), steps=4, lr=1e-2, batch_size=3, seed=2, progress=False)
    with assert_model_unchanged(any_model):
        light = train_control_model(any_model, task, share_weights=True, **settings)
        full = train_control_model(any_model, task, share_weights=False, **settings)
    base = dict(as_adapter(any_model).model.named_parameters())
    own = set(low_rank_targets(any_model))
    for name, p in as_adapter(light).model.named_parameters():
        assert (p.data_ptr() == base[name].data_ptr()) == (name not in own), name
    assert parameter_fingerprint(light) == parameter_fingerprint(full)  # same training, bit for bit
    tokens = _tokens(any_model)
    assert not torch.equal(_logits(light, tokens), _logits(any_model, tokens))
    folder = save_control_model(light, tmp_path / "c", base_model=any_model, task="qa")
    reloaded = load_control_model(any_model, folder, share_weights=True)
    assert parameter_fingerprint(reloaded) == parameter_fingerprint(light)
    torch.testing.assert_close(_logits(reloaded, tokens), _logits(full, tokens), atol=0, rtol=0)


def test_copy_model_shares_what_it_is_told(bridge_llama):
    names = trained_parameter_names(bridge_llama, LowRank(targets=("v",)))
    twin = copy_model(bridge_llama, share_except=names)
    base = dict(bridge_llama.named_parameters())
    for name, p in twin.named_parameters():
        assert (p.data_ptr() == base[name].data_ptr()) == (name not in names)
    with pytest.raises(ValueError, match="not parameters of the model"):
        copy_model(bridge_llama, share_except=["no.such.weight"])


@pytest.mark.parametrize("kwargs, message", [({"rank": 0}, "rank must be a positive integer"),
                                             ({"alpha": -1.0}, "alpha must be positive"),
                                             ({"targets": ("q", "x")}, "targets must be a non-empty subset")])
def test_bad_low_rank_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRank(**kwargs)


@pytest.mark.parametrize("neurons", ["set", None])
def test_shared_weight_control_of_a_neuron_set_or_all_parameters_equals_an_independent_copy(bridge_llama, tiny_tasks, neurons):
    from tl_taskmap.neurons.sets import NeuronSet

    spec = NeuronSet(3, 48, {0: [1, 5], 2: [7]}) if neurons == "set" else None
    settings = dict(neurons=spec, steps=3, lr=1e-2, batch_size=3, seed=1, progress=False)
    with assert_model_unchanged(bridge_llama):
        light = train_control_model(bridge_llama, tiny_tasks["qa"], share_weights=True, **settings)
        full = train_control_model(bridge_llama, tiny_tasks["qa"], share_weights=False, **settings)
    assert parameter_fingerprint(light) == parameter_fingerprint(full)
    own = set(trained_parameter_names(bridge_llama, spec))
    base = dict(bridge_llama.named_parameters())
    assert all((p.data_ptr() == base[n].data_ptr()) == (n not in own) for n, p in light.named_parameters())
