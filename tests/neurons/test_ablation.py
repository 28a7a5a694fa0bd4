"""ablate(): activation-zero = parameter-zero, exact restoration, no-ops, mean mode, errors, nesting; effects."""

import pytest
import torch

from tests.helpers import assert_ablation_restores_on_every_exit
from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.models import as_adapter, hook_point_hook_counts, parameter_fingerprint
from tl_taskmap.neurons.ablation import ablate, ablation_effect, ablation_effects, mean_activations
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task

PROMPTS = ["the quick brown fox", "a b c", "good movie review"]


def some_neurons(adapter, fraction=0.3, seed=0):
    scores = torch.rand(adapter.n_layers, adapter.d_mlp, generator=torch.Generator().manual_seed(seed))
    return NeuronSet.top_k(scores, fraction, per_layer=False, name="some")


def warm(model):
    """One forward pass: the bridge adds internal hooks on its first pass; return a batch and the logits."""
    a = as_adapter(model)
    batch = a.tokenize(PROMPTS)
    return a, batch, a.forward(batch)


def capture_post(adapter, batch, layer):
    seen = {}
    with adapter.hooks([(adapter.hook_name(layer, "mlp_post"), lambda x, hook: seen.__setitem__("x", x.detach().clone()))]):
        adapter.forward(batch)
    return seen["x"]


def test_activation_zero_equals_parameter_zero(any_model):
    a, batch, base = warm(any_model)
    neurons = some_neurons(a)
    assert len(neurons.layers()) == a.n_layers
    with ablate(any_model, neurons, "zero"):
        zero = a.forward(batch)
        post_zero = capture_post(a, batch, 1)
    with ablate(any_model, neurons, "params") as handle:
        params = a.forward(batch)
        post_params = capture_post(a, batch, 1)
    assert handle.mode == "params" and handle.hook_names == ()
    assert (zero - base).abs().max() > 1e-3  # the ablation does something
    torch.testing.assert_close(params, zero, atol=1e-5, rtol=0)
    # Parameter-zeroing gives pre-activation 0 and act(0) = 0 for GELU/SiLU: hook_post is exactly 0 too.
    idx = neurons.indices(1)
    assert torch.all(post_params[..., idx] == 0) and torch.all(post_zero[..., idx] == 0)
    torch.testing.assert_close(post_params, post_zero, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "mean", "params"])
def test_model_restored_exactly_on_every_exit(any_model, mode):
    a, batch, base = warm(any_model)
    neurons = some_neurons(a)
    means = torch.randn(a.n_layers, a.d_mlp) if mode == "mean" else None
    assert_ablation_restores_on_every_exit(any_model, neurons, mode, means, a, batch, base)


def test_empty_set_is_exact_noop(any_model):
    a, batch, base = warm(any_model)
    hooks = hook_point_hook_counts(any_model)
    empty = NeuronSet.empty(a.n_layers, a.d_mlp)
    for mode, means in (("zero", None), ("params", None), ("mean", torch.zeros(a.n_layers, a.d_mlp))):
        with ablate(any_model, empty, mode, mean_activations=means) as handle:
            assert handle.hook_names == () and hook_point_hook_counts(any_model) == hooks
            assert torch.equal(a.forward(batch), base)


def mlp_out_bias(model, layer):
    mlp = model.blocks[layer].mlp
    bias = getattr(mlp, "b_out", None)
    if bias is None:
        bias = getattr(getattr(mlp.out, "_original_component", mlp.out), "bias", None)
    return bias


@pytest.mark.parametrize("mode", ["zero", "params"])
def test_whole_layer_equals_zeroing_the_mlp_hidden_layer(any_model, mode):
    a, batch, _ = warm(any_model)
    layer = 1
    everything = NeuronSet(a.n_layers, a.d_mlp, {layer: range(a.d_mlp)})
    mlp_out = {}
    record = lambda x, hook: mlp_out.__setitem__("x", x.detach().clone())  # noqa: E731
    with ablate(any_model, everything, mode):
        with any_model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", record)]):
            ablated = a.forward(batch)
    # Independently: TransformerLens's own hook multiplying the hidden layer by 0.
    with any_model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", lambda x, hook: x * 0)]):
        reference = a.forward(batch)
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=0)
    # With no hidden activity the MLP outputs its output bias (or zeros) at every position.
    bias = mlp_out_bias(any_model, layer)
    expected = torch.zeros_like(mlp_out["x"]) + (bias.detach() if bias is not None else 0)
    torch.testing.assert_close(mlp_out["x"], expected, atol=1e-6, rtol=0)


def test_mean_mode_sets_exactly_the_given_means(any_model):
    a, batch, _ = warm(any_model)
    neurons = some_neurons(a, 0.25, seed=1)
    means = torch.randn(a.n_layers, a.d_mlp, generator=torch.Generator().manual_seed(3))
    before = [capture_post(a, batch, layer) for layer in range(a.n_layers)]
    with ablate(any_model, neurons, "mean", mean_activations=means):
        after = [capture_post(a, batch, layer) for layer in range(a.n_layers)]
    mask = neurons.to_mask()
    for layer in range(a.n_layers):
        on, off = mask[layer], ~mask[layer]
        assert torch.equal(after[layer][..., on], means[layer][on].expand_as(after[layer][..., on]))
        if layer == 0:  # later layers see changed inputs; layer 0's other neurons must be untouched
            assert torch.equal(after[layer][..., off], before[layer][..., off])


def test_mean_activations_over_real_tokens(bridge_llama):
    a = as_adapter(bridge_llama)
    prompts = ["the quick brown fox jumps", "a b", "good movie"]
    means = mean_activations(bridge_llama, prompts, batch_size=2)
    assert means.shape == (a.n_layers, a.d_mlp) and means.dtype == torch.float32
    rows = []  # one prompt at a time: no padding at all
    for p in prompts:
        rows.append(torch.stack([capture_post(a, a.tokenize([p]), layer)[0] for layer in range(a.n_layers)]))
    expected = torch.cat(rows, dim=1).double().mean(1)  # [layer, tokens, d] -> mean over all tokens
    torch.testing.assert_close(means.double(), expected, atol=1e-5, rtol=1e-5)
    task = Task.from_lists("t", prompts, [" x"] * 3)
    torch.testing.assert_close(mean_activations(bridge_llama, task), means, atol=1e-5, rtol=1e-5)


def test_random_sets_match_counts_and_are_reproducible(bridge_llama):
    a = as_adapter(bridge_llama)
    neurons = some_neurons(a, 0.2)
    r0, r0_again, r1 = neurons.random_like(0), neurons.random_like(0), neurons.random_like(1)
    assert r0.counts_per_layer() == neurons.counts_per_layer() == r1.counts_per_layer()
    assert r0 == r0_again and r0 != r1
    _, batch, _ = warm(bridge_llama)
    with ablate(bridge_llama, r0):
        x = a.forward(batch)
    with ablate(bridge_llama, r0_again):
        assert torch.equal(a.forward(batch), x)


def test_mismatched_set_gets_clear_error_and_model_untouched(any_model):
    a, batch, base = warm(any_model)
    fingerprint, hooks = parameter_fingerprint(any_model), hook_point_hook_counts(any_model)
    wrong_width = NeuronSet(a.n_layers, a.d_mlp + 4, {0: [a.d_mlp + 1]}, name="other_model")
    for mode in ("zero", "params"):
        with pytest.raises(ValueError, match=rf"'other_model'.*d_mlp={a.d_mlp + 4}.*d_mlp={a.d_mlp} \(layer 0\)"):
            with ablate(any_model, wrong_width, mode):
                pytest.fail("the block must not run")
    with pytest.raises(ValueError, match=rf"n_layers={a.n_layers + 1}.*n_layers={a.n_layers}"):
        with ablate(any_model, NeuronSet(a.n_layers + 1, a.d_mlp), "zero"):
            pass
    assert parameter_fingerprint(any_model) == fingerprint and hook_point_hook_counts(any_model) == hooks
    assert torch.equal(a.forward(batch), base)


def test_argument_errors(bridge_llama):
    a, _, _ = warm(bridge_llama)
    neurons = some_neurons(a)
    with pytest.raises(ValueError, match="unknown ablation mode"):
        with ablate(bridge_llama, neurons, "ones"):
            pass
    with pytest.raises(ValueError, match="needs mean_activations"):
        with ablate(bridge_llama, neurons, "mean"):
            pass
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected .*\(3, 48\)"):
        with ablate(bridge_llama, neurons, "mean", mean_activations=torch.zeros(2, 3)):
            pass
    with pytest.raises(ValueError, match="only used with mode='mean'"):
        with ablate(bridge_llama, neurons, "zero", mean_activations=torch.zeros(3, 48)):
            pass
    with pytest.raises(TypeError, match="expected a NeuronSet"):
        with ablate(bridge_llama, {0: [1]}):
            pass
    bridge_llama.cfg.act_fn = "solu_ln"
    fingerprint = parameter_fingerprint(bridge_llama)
    with pytest.raises(ValueError, match="solu"):
        with ablate(bridge_llama, neurons, "params"):
            pass
    assert parameter_fingerprint(bridge_llama) == fingerprint


def test_nesting_and_user_hooks(any_model):
    a, batch, base = warm(any_model)
    first, second = some_neurons(a, 0.2, seed=0), some_neurons(a, 0.2, seed=1)
    with ablate(any_model, first | second, "zero"):
        union = a.forward(batch)
    fingerprint, hooks = parameter_fingerprint(any_model), hook_point_hook_counts(any_model)
    calls = []

    def user_hook(x, hook):
        calls.append(hook.name)

    with any_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", user_hook)]):
        with ablate(any_model, first, "params"):
            with ablate(any_model, second, "zero"):
                torch.testing.assert_close(a.forward(batch), union, atol=1e-5, rtol=0)
            with ablate(any_model, second, "params"):  # overlapping params contexts restore in order
                torch.testing.assert_close(a.forward(batch), union, atol=1e-5, rtol=0)
            single = a.forward(batch)
        assert not torch.allclose(single, union)
        n_calls = len(calls)
        assert n_calls == 3
        assert torch.equal(a.forward(batch), base)  # user hook still on (it only records), ablations gone
        assert len(calls) == n_calls + 1
    assert parameter_fingerprint(any_model) == fingerprint and hook_point_hook_counts(any_model) == hooks


def test_user_hook_added_inside_sees_ablated_activation(bridge_gpt2):
    a, batch, _ = warm(bridge_gpt2)
    neurons = NeuronSet(a.n_layers, a.d_mlp, {2: [0, 1, 2]})
    with ablate(bridge_gpt2, neurons) as handle:
        assert handle.hook_names == ("blocks.2.mlp.hook_post",) and handle.model is bridge_gpt2
        seen = {}
        with bridge_gpt2.hooks(fwd_hooks=[("blocks.2.mlp.hook_post", lambda x, hook: seen.__setitem__("x", x.detach().clone()))]):
            a.forward(batch)
    assert torch.all(seen["x"][..., :3] == 0) and seen["x"][..., 3:].abs().sum() > 0


def choice_task(name="choice"):
    prompts = ["the quick brown fox", "a b c", "good movie", "0 1 2 + 3 =", "bad review"]
    options = [" yes", " no", " maybe"]
    return Task.from_lists(name, prompts, [options[i % 3] for i in range(5)], options=options)


def test_ablation_effect_matches_direct_evaluation(any_model):
    a, _, _ = warm(any_model)
    task, neurons = choice_task(), some_neurons(a, 0.5)
    effect = ablation_effect(any_model, task, neurons, "zero", batch_size=4)
    base = evaluate_task(any_model, task, batch_size=4)
    with ablate(any_model, neurons):
        ablated = evaluate_task(any_model, task, batch_size=4)
    assert effect.delta == pytest.approx(ablated.metric_value - base.metric_value)
    assert effect.loss_delta == pytest.approx(ablated.loss - base.loss, abs=1e-6)
    assert effect.loss_delta != 0
    low, high = effect.interval()
    assert low <= effect.delta <= high
    df = ablation_effects(any_model, [task, choice_task("again")], neurons, "params", batch_size=4)
    assert list(df["task"]) == ["choice", "again"]
    assert df["loss_delta"].iloc[0] == pytest.approx(effect.loss_delta, abs=1e-5)
    assert {"baseline", "ablated", "delta", "ci_low", "ci_high", "baseline_loss", "ablated_loss"} <= set(df.columns)
    assert "Δ" in repr(effect)


def test_gradients_flow_through_activation_ablation(any_model):
    a, batch, _ = warm(any_model)
    neurons = NeuronSet(a.n_layers, a.d_mlp, {1: [0, 3, 7]})
    w_out = next(p for p in a.neuron_params(1) if p.role == "W_out")
    any_model.zero_grad(set_to_none=True)
    with ablate(any_model, neurons, "zero"):
        a.forward(batch).float().logsumexp(-1).sum().backward()
    grad = w_out.param.grad
    assert grad is not None
    # A zeroed activation contributes nothing, so the ablated neurons' output rows get zero gradient.
    assert torch.all(grad.index_select(w_out.dim, neurons.indices(1)) == 0)
    assert grad.abs().sum() > 0
    any_model.zero_grad(set_to_none=True)
