"""Head ablation: zero at hook_z equals zeroing the head's W_O rows (computed here by hand), exact
restoration on every exit path, mean mode, GQA, errors, and the ablation matrix / specificity for head sets."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_ablation_restores_on_every_exit
from tests.neurons.test_heads_relevance import head_model  # noqa: F401 - fixture
from tl_taskmap.models import as_adapter, hook_point_hook_counts, parameter_fingerprint
from tl_taskmap.neurons.ablation import ablate, ablation_effect
from tl_taskmap.neurons.ablation_effects import ablation_matrix, specificity
from tl_taskmap.neurons.head_ablation import head_mean_activations
from tl_taskmap.neurons.heads import head_layout, split_heads
from tl_taskmap.neurons.sets import HeadSet, NeuronSet
from tl_taskmap.tasks import Task

PROMPTS = ["the quick brown fox", "a b c", "good movie review"]


def some_heads(model, fraction=0.4, seed=0):
    lay = head_layout(model)
    scores = torch.rand(lay.n_layers, lay.n_heads, generator=torch.Generator().manual_seed(seed))
    return HeadSet.top_k(scores, fraction, per_layer=False, name="some")


def warm(model):
    a = as_adapter(model)
    batch = a.tokenize(PROMPTS)
    with torch.no_grad():
        return a, batch, a.forward(batch)


def zero_w_o_rows_by_hand(model, heads):
    """Zero W_O[h] without tl_taskmap: the HookedTransformer parameter, or the HF projection's columns/rows."""
    lay = head_layout(model)
    saved = []
    for layer in heads.layers():
        attn = model.blocks[layer].attn
        for h in heads.indices(layer).tolist():
            if hasattr(attn, "W_O") and isinstance(attn.W_O, torch.nn.Parameter):
                view = attn.W_O.data[h]
            else:
                inner = attn.o._original_component
                cols = slice(h * lay.d_head, (h + 1) * lay.d_head)
                view = inner.weight.data[cols, :] if type(inner).__name__ == "Conv1D" else inner.weight.data[:, cols]
            saved.append((view, view.clone()))
            view.zero_()
    return saved


def assert_zero_and_params_equal_w_o_rows_by_hand(model, heads, a, batch, base):
    """Zero mode, params mode and W_O rows zeroed by hand give the same logits (and differ from ``base``); returns the zero-mode handle."""
    with torch.no_grad():
        with ablate(model, heads, "zero") as handle:
            zero = a.forward(batch)
        saved = zero_w_o_rows_by_hand(model, heads)
        by_hand = a.forward(batch)
        for view, original in saved:
            view.copy_(original)
        with ablate(model, heads, "params"):
            params = a.forward(batch)
    assert (zero - base).abs().max() > 1e-3
    torch.testing.assert_close(zero, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(params, by_hand, atol=1e-5, rtol=0)
    return handle


def test_zero_ablation_equals_zeroed_w_o_rows(head_model):
    a, batch, base = warm(head_model)
    heads = some_heads(head_model)
    assert len(heads.layers()) >= 2
    handle = assert_zero_and_params_equal_w_o_rows_by_hand(head_model, heads, a, batch, base)
    assert handle.hook_names == tuple(f"blocks.{l}.attn.hook_z" for l in heads.layers())
    torch.testing.assert_close(a.forward(batch), base, atol=0, rtol=0)


def test_zero_ablation_zeroes_exactly_the_heads_outputs(head_model):
    a, batch, _ = warm(head_model)
    lay = head_layout(head_model)
    heads = HeadSet(lay.n_layers, lay.n_heads, {1: [0, lay.n_heads - 1]})
    seen = {}
    with torch.no_grad(), ablate(head_model, heads):
        with a.hooks([("blocks.1.attn.hook_z", lambda z, hook: seen.__setitem__("z", z.clone()))]):
            a.forward(batch)
    per_head = split_heads(seen["z"], lay.n_heads, lay.d_head)
    assert torch.all(per_head[:, :, [0, lay.n_heads - 1]] == 0)
    assert torch.all(per_head[:, :, 1:-1].abs().sum((0, 1, 3)) > 0)


@pytest.mark.parametrize("mode", ["zero", "mean", "params"])
def test_model_restored_exactly_on_every_exit(head_model, mode):
    a, batch, base = warm(head_model)
    lay = head_layout(head_model)
    heads = some_heads(head_model)
    means = torch.randn(lay.n_layers, lay.n_heads, lay.d_head) if mode == "mean" else None
    assert_ablation_restores_on_every_exit(head_model, heads, mode, means, a, batch, base)


def test_empty_set_is_exact_noop_and_mean_mode_sets_means(head_model):
    a, batch, base = warm(head_model)
    lay = head_layout(head_model)
    with torch.no_grad(), ablate(head_model, HeadSet.empty(lay.n_layers, lay.n_heads)) as handle:
        assert handle.hook_names == () and torch.equal(a.forward(batch), base)
    means = torch.randn(lay.n_layers, lay.n_heads, lay.d_head)
    heads = HeadSet(lay.n_layers, lay.n_heads, {2: [1]})
    seen = {}
    with torch.no_grad(), ablate(head_model, heads, "mean", mean_activations=means):
        with a.hooks([("blocks.2.attn.hook_z", lambda z, hook: seen.__setitem__("z", z.clone()))]):
            a.forward(batch)
    per_head = split_heads(seen["z"], lay.n_heads, lay.d_head)
    torch.testing.assert_close(per_head[:, :, 1], means[2, 1].expand_as(per_head[:, :, 1]), rtol=0, atol=0)


def test_head_mean_activations_over_real_tokens(bridge_llama):
    a = as_adapter(bridge_llama)
    lay = head_layout(bridge_llama)
    means = head_mean_activations(bridge_llama, PROMPTS, batch_size=2)
    assert means.shape == (lay.n_layers, lay.n_heads, lay.d_head) and means.dtype == torch.float32
    rows = []
    for prompt in PROMPTS:  # one prompt at a time: no padding at all
        seen = {}
        with torch.no_grad(), a.hooks([("blocks.1.attn.hook_z", lambda z, hook: seen.__setitem__("z", z.clone()))]):
            a.forward(a.tokenize([prompt]))
        rows.append(split_heads(seen["z"], lay.n_heads, lay.d_head)[0].double())
    expected = torch.cat(rows).mean(0).float()
    torch.testing.assert_close(means[1], expected, rtol=1e-5, atol=1e-6)


def test_errors_leave_model_untouched(bridge_gpt2):
    a, batch, base = warm(bridge_gpt2)
    lay = head_layout(bridge_gpt2)
    fingerprint, hooks = parameter_fingerprint(bridge_gpt2), hook_point_hook_counts(bridge_gpt2)
    with pytest.raises(ValueError, match=r"HeadSet was built for n_heads=9 but the model has n_heads=4"):
        with ablate(bridge_gpt2, HeadSet(lay.n_layers, 9, {0: [8]})):
            pass
    with pytest.raises(ValueError, match=r"needs mean_activations=\[n_layers, n_heads, d_head\]"):
        with ablate(bridge_gpt2, some_heads(bridge_gpt2), "mean"):
            pass
    with pytest.raises(ValueError, match=r"expected \(n_layers, n_heads, d_head\)"):
        with ablate(bridge_gpt2, some_heads(bridge_gpt2), "mean", mean_activations=torch.zeros(lay.n_layers, 48)):
            pass
    with pytest.raises(ValueError, match="unknown ablation mode"):
        with ablate(bridge_gpt2, some_heads(bridge_gpt2), "half"):
            pass
    assert parameter_fingerprint(bridge_gpt2) == fingerprint and hook_point_hook_counts(bridge_gpt2) == hooks
    with torch.no_grad():
        assert torch.equal(a.forward(batch), base)


def test_nesting_with_neuron_ablation_and_gradients(bridge_llama):
    a, batch, base = warm(bridge_llama)
    heads, neurons = some_heads(bridge_llama), NeuronSet(3, 48, {0: [1, 2]})
    with torch.no_grad():
        with ablate(bridge_llama, heads), ablate(bridge_llama, neurons, "params"):
            both = a.forward(batch)
        with ablate(bridge_llama, neurons, "params"), ablate(bridge_llama, heads, "params"):
            both_params = a.forward(batch)
    torch.testing.assert_close(both, both_params, atol=1e-5, rtol=0)
    with ablate(bridge_llama, heads):  # activation ablation keeps autograd valid
        emb = a.model.embed.weight if hasattr(a.model, "embed") else None
        logits = a.forward(batch)
        logits.sum().backward()
    a.model.zero_grad(set_to_none=True)
    assert emb is None or emb.grad is None
    with torch.no_grad():
        assert torch.equal(a.forward(batch), base)


def test_ablation_effect_matrix_and_specificity_for_head_sets(bridge_gpt2):
    lay = head_layout(bridge_gpt2)
    tasks = [Task.from_lists("a", ["the quick brown", "a b c", "good movie"], [" fox", " d", " review"], metric="exact_match"),
             Task.from_lists("b", ["one two", "x y", "yes no"], [" three", " z", " maybe"], metric="exact_match")]
    sets = {"a": HeadSet(lay.n_layers, lay.n_heads, {0: [1], 2: [3]}), "b": HeadSet(lay.n_layers, lay.n_heads, {1: [0]})}
    effect = ablation_effect(bridge_gpt2, tasks[0], sets["a"], batch_size=2)
    assert effect.loss_delta != 0
    matrix = ablation_matrix(bridge_gpt2, tasks, sets, seeds=2, progress=False, batch_size=2)
    assert matrix.meta["unit"] == "head"
    frame = matrix.to_dataframe()
    own = frame[(frame.kind == "task") & (frame.ablated_set == "a") & (frame.evaluated_task == "a")].iloc[0]
    assert own.loss_delta == pytest.approx(effect.loss_delta, abs=1e-6) and own.n_neurons == 2
    random_rows = frame[(frame.kind == "random") & (frame.ablated_set == "a")]
    assert set(random_rows.n_neurons) == {2}
    spec = specificity(matrix)
    assert list(spec.task) == ["a", "b"] and spec.vs_random.notna().all()
    means = head_mean_activations(bridge_gpt2, tasks[0])
    mean_matrix = ablation_matrix(bridge_gpt2, tasks, sets, seeds=0, mode="mean", mean_activations=means, progress=False)
    assert mean_matrix.mode == "mean"
    with pytest.raises(ValueError, match="mixes unit kinds"):
        ablation_matrix(bridge_gpt2, tasks, {"a": sets["a"], "n": NeuronSet(3, 128, {0: [1]})}, seeds=0, progress=False)
    with pytest.raises(ValueError, match="needs mean_activations"):
        ablation_matrix(bridge_gpt2, tasks, sets, seeds=0, mode="mean", progress=False)


@pytest.mark.real_model
def test_real_model_zero_equals_w_o_rows_and_restores():
    from tl_taskmap.embedded import load_default_model

    model = load_default_model()
    a, batch, base = warm(model)
    heads = some_heads(model, fraction=0.1)
    fingerprint = parameter_fingerprint(model)
    assert_zero_and_params_equal_w_o_rows_by_hand(model, heads, a, batch, base)
    assert parameter_fingerprint(model) == fingerprint
