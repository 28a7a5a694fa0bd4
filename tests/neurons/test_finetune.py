"""Masked fine-tuning: frozen entries bit-identical under AdamW + weight decay, determinism, restoration,
errors, and control-model save/load."""

import copy

import pytest
import torch

from tl_taskmap.models import as_adapter, parameter_fingerprint
from tl_taskmap.neurons.masked_training import (
    finetune,
    load_control_model,
    save_control_model,
    train_control_model,
    trainable_neurons,
)
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task

PROMPTS = ["the quick brown", "a b c", "good movie", "0 1 2 +", "bad review", "the lazy", "x y z", "great film"]
TARGETS = [" fox", " d", " positive", " 3", " negative", " dog", " a", " positive"]


def tiny_task(name="tiny"):
    return Task.from_lists(name, PROMPTS, TARGETS)


def bits(t):
    """Exact bit pattern of a float tensor, for bitwise comparison (NaN- and -0.0-safe)."""
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def neuron_param_ids(model):
    a = as_adapter(model)
    return {id(p.param): (layer, p) for layer in range(a.n_layers) for p in a.neuron_params(layer)}


def some_neurons(model):
    a = as_adapter(model)
    return NeuronSet(a.n_layers, a.d_mlp, {0: [0, 3, 7], a.n_layers - 1: [1, 2]}, name="picked")


def snapshot(model):
    return {n: p.detach().clone() for n, p in as_adapter(model).model.named_parameters()}


def test_only_the_sets_entries_move_under_adamw_weight_decay(any_model):
    neurons = some_neurons(any_model)
    before = snapshot(any_model)
    res = finetune(any_model, tiny_task(), neurons, steps=3, lr=1e-2, weight_decay=0.5, batch_size=4, progress=False)
    owned = neuron_param_ids(any_model)
    mask = neurons.to_mask()
    n_partial = 0
    for name, p in as_adapter(any_model).model.named_parameters():
        if id(p) not in owned or owned[id(p)][0] not in neurons.layers():
            assert torch.equal(bits(p), bits(before[name])), f"{name} moved but is outside the set"
            continue
        layer, np_ = owned[id(p)]
        n_partial += 1
        keep = mask[layer]
        old, new = before[name].movedim(np_.dim, 0), p.detach().movedim(np_.dim, 0)
        assert torch.equal(bits(new[~keep]), bits(old[~keep])), f"{name}: a frozen neuron's entries moved"
        for j in torch.nonzero(keep).flatten().tolist():
            assert not torch.equal(new[j], old[j]), f"{name}: trained neuron {j} did not move"
    n_roles = len(as_adapter(any_model).neuron_params(0))
    assert n_partial == 2 * n_roles
    assert res.n_neurons == 5 and len(res.losses) == 3
    per_neuron = sum(p.param.numel() // p.param.shape[p.dim] for p in as_adapter(any_model).neuron_params(0))
    assert res.n_trainable == 5 * per_neuron


def test_gradient_masking_alone_would_leak_weight_decay(bridge_llama):
    # The premise of update masking: AdamW with a masked gradient still moves frozen entries.
    w = as_adapter(bridge_llama).neuron_params(0)[0].param
    old = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.5)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert not torch.equal(w.detach(), old)


def test_full_finetuning_moves_every_parameter(any_model):
    before = snapshot(any_model)
    res = finetune(any_model, tiny_task(), "all", steps=2, lr=1e-2, weight_decay=0.1, progress=False)
    params = dict(as_adapter(any_model).model.named_parameters())
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    assert res.n_neurons is None and res.n_trainable == sum(p.numel() for p in params.values())


def test_random_baseline_has_the_same_per_layer_budget(bridge_gpt2):
    neurons = some_neurons(bridge_gpt2)
    random_set = neurons.random_like(seed=3)
    assert random_set.counts_per_layer() == neurons.counts_per_layer() and random_set != neurons
    model2 = copy.deepcopy(bridge_gpt2)
    a = finetune(bridge_gpt2, tiny_task(), neurons, steps=1, progress=False)
    b = finetune(model2, tiny_task(), random_set, steps=1, progress=False)
    assert a.n_trainable == b.n_trainable and a.n_neurons == b.n_neurons


def test_same_seed_same_parameters_other_seed_differs(bridge_llama):
    neurons = some_neurons(bridge_llama)
    models = [copy.deepcopy(bridge_llama) for _ in range(3)]
    rng_state = torch.get_rng_state()
    for m, seed in zip(models, [7, 7, 8]):
        finetune(m, tiny_task(), neurons, steps=3, batch_size=3, lr=1e-2, seed=seed, dropout=True, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state), "the global RNG must be untouched"
    prints = [parameter_fingerprint(m) for m in models]
    assert prints[0] == prints[1]
    assert prints[0] != prints[2]


def test_flags_grads_and_mode_restored(any_model):
    net = as_adapter(any_model).model
    frozen_name = next(n for n, _ in net.named_parameters())
    dict(net.named_parameters())[frozen_name].requires_grad_(False)
    net.train()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    finetune(any_model, tiny_task(), some_neurons(any_model), steps=1, progress=False)
    assert net.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert all(p.grad is None for p in net.parameters())


def test_failed_step_leaves_the_model_as_after_the_last_completed_step(bridge_llama):
    neurons = some_neurons(bridge_llama)
    before = parameter_fingerprint(bridge_llama)
    net = as_adapter(bridge_llama).model
    stale = next(iter(net.parameters()))
    stale.grad = torch.ones_like(stale)

    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1.0)  # the optimizer only ever holds slice copies, never the model's tensors
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        finetune(bridge_llama, tiny_task(), neurons, steps=2, optimizer=Exploding, progress=False)
    assert parameter_fingerprint(bridge_llama) == before
    assert not bridge_llama.training and all(p.requires_grad for p in net.parameters())
    assert torch.equal(stale.grad, torch.ones_like(stale)), "the user's gradient is put back"


def test_update_mask_context_for_custom_loops(bridge_gpt2):
    neurons = some_neurons(bridge_gpt2)
    a = as_adapter(bridge_gpt2)
    owners = [p.param for layer in neurons.layers() for p in a.neuron_params(layer)]
    with trainable_neurons(bridge_gpt2, neurons) as mask:
        assert len(mask.params) == len(owners) == 2 * len(a.neuron_params(0))
        assert all(p.requires_grad == any(p is q for q in owners) for p in bridge_gpt2.parameters())
        assert not any(p is q for p in mask.params for q in bridge_gpt2.parameters()), "the optimizer gets copies"
        # a hand-written loop with a huge weight decay: only the set's slices move
        before = snapshot(bridge_gpt2)
        opt = torch.optim.AdamW(mask.params, lr=1.0, weight_decay=10.0)
        batch = a.tokenize(PROMPTS[:2], TARGETS[:2])
        from tl_taskmap.evaluate import answer_nll

        answer_nll(a.forward(batch), batch).mean().backward()
        mask.gather_gradients()
        opt.step()
        mask.write_back()
        w_in = owners[0]
        name = next(n for n, p in bridge_gpt2.named_parameters() if p is w_in)
        moved = (w_in.detach() != before[name]).any(dim=1 - a.neuron_params(0)[0].dim)
        assert torch.equal(torch.nonzero(moved).flatten(), neurons.indices(0))
    assert all(p.requires_grad for p in bridge_gpt2.parameters())


def test_empty_and_mismatched_sets_fail_before_touching_the_model(bridge_llama):
    a = as_adapter(bridge_llama)
    before = parameter_fingerprint(bridge_llama)
    with pytest.raises(ValueError, match="empty"):
        finetune(bridge_llama, tiny_task(), NeuronSet.empty(a.n_layers, a.d_mlp), steps=1, progress=False)
    with pytest.raises(ValueError, match=rf"d_mlp={a.d_mlp + 1}.*layer 0"):
        finetune(bridge_llama, tiny_task(), NeuronSet(a.n_layers, a.d_mlp + 1, {0: [1]}), steps=1, progress=False)
    with pytest.raises(ValueError, match="n_layers"):
        finetune(bridge_llama, tiny_task(), NeuronSet(a.n_layers + 1, a.d_mlp, {0: [1]}), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        finetune(bridge_llama, tiny_task(), "all", steps=0, progress=False)
    with pytest.raises(TypeError, match="NeuronSet"):
        finetune(bridge_llama, tiny_task(), [0, 1], steps=1, progress=False)
    assert parameter_fingerprint(bridge_llama) == before
    assert all(p.requires_grad for p in bridge_llama.parameters())


def logits_of(model, prompts=PROMPTS[:4]):
    a = as_adapter(model)
    with torch.no_grad():
        return a.forward(a.tokenize(prompts))


@pytest.mark.parametrize("delta", [True, False])
def test_control_model_save_load_round_trip(any_model, tmp_path, delta):
    base_print = parameter_fingerprint(any_model)
    control, res = train_control_model(any_model, tiny_task(), neurons=some_neurons(any_model), steps=2, lr=1e-2,
                                       return_result=True, progress=False)
    assert parameter_fingerprint(any_model) == base_print, "the base model must not change"
    assert res.n_neurons == 5
    folder = save_control_model(control, tmp_path / "ctl", base_model=any_model if delta else None, task="tiny")
    loaded = load_control_model(any_model, folder)
    assert parameter_fingerprint(loaded) == parameter_fingerprint(control)
    assert torch.equal(logits_of(loaded), logits_of(control))
    assert not torch.equal(logits_of(loaded), logits_of(any_model))
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    n_params = len(list(as_adapter(any_model).model.named_parameters()))
    expected = 2 * len(as_adapter(any_model).neuron_params(0)) if delta else n_params
    assert manifest["delta"] is delta and len(manifest["tensors"]) == expected


def test_control_model_delta_refuses_another_base(bridge_llama, tmp_path):
    control = train_control_model(bridge_llama, tiny_task(), steps=1, lr=1e-2, progress=False)
    folder = save_control_model(control, tmp_path / "ctl", base_model=bridge_llama)
    with pytest.raises(ValueError, match="not that base"):
        load_control_model(control, folder)
    with pytest.raises(ValueError, match="not a saved control model"):
        load_control_model(bridge_llama, tmp_path)


@pytest.mark.real_model
def test_real_model_masked_finetuning_is_bit_exact_outside_the_set():
    from tl_taskmap.embedded import ModelPackageMissingError, load_default_model

    try:
        model = load_default_model()
    except ModelPackageMissingError as err:
        pytest.skip(str(err))
    a = as_adapter(model)
    neurons = NeuronSet.from_mask(torch.rand(a.n_layers, a.d_mlp, generator=torch.Generator().manual_seed(0)) < 0.1)
    before = snapshot(model)
    task = Task.from_lists("words", ["Word: happy\nSentiment:", "Word: awful\nSentiment:"] * 2, [" positive", " negative"] * 2)
    res = finetune(model, task, neurons, steps=2, lr=1e-3, weight_decay=0.1, batch_size=2, progress=False)
    owned = neuron_param_ids(model)
    mask = neurons.to_mask()
    for name, p in a.model.named_parameters():
        if id(p) not in owned:
            assert torch.equal(bits(p), bits(before[name])), name
            continue
        layer, np_ = owned[id(p)]
        old, new = before[name].movedim(np_.dim, 0), p.detach().movedim(np_.dim, 0)
        assert torch.equal(bits(new[~mask[layer]]), bits(old[~mask[layer]])), name
        assert (new[mask[layer]] != old[mask[layer]]).flatten(1).any(1).all(), name
    assert res.n_neurons == len(neurons) and res.losses[1] < res.losses[0]
