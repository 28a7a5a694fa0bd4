"""Tests for tl_taskmap.neurons.similarity against a direct NumPy computation on the raw parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.neurons.similarity import neuron_parameter_matrix, parameter_similarity, parameter_similarity_matrix


def random_set(n_layers: int, d_mlp: int, seed: int, k: int) -> NeuronSet:
    rng = np.random.default_rng(seed)
    return NeuronSet(n_layers, d_mlp, {layer: rng.choice(d_mlp, size=k, replace=False) for layer in range(n_layers)})


def numpy_cosine(adapter, layer: int, a: NeuronSet, b: NeuronSet, method: str) -> float:
    """Straight from the definition, on whole parameter tensors (no per-neuron matrix, no Gram)."""
    vectors = {}
    for name, neurons in (("a", a), ("b", b)):
        mask = neurons.to_mask()[layer].numpy()
        parts = []
        for p in adapter.neuron_params(layer):
            weight = p.param.detach().double().numpy()
            if method == "masked":
                shape = [1] * weight.ndim
                shape[p.dim] = -1
                parts.append((weight * mask.reshape(shape)).reshape(-1))  # zero the rows of other neurons, flatten
            else:
                picked = np.take(weight, np.flatnonzero(mask), axis=p.dim)
                parts.append(np.moveaxis(picked, p.dim, 0).reshape(mask.sum(), -1).mean(0))
        vectors[name] = np.concatenate(parts)
    x, y = vectors["a"], vectors["b"]
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("method", ["masked", "mean"])
def test_matches_numpy(any_model, method):
    adapter = as_adapter(any_model)
    a = random_set(adapter.n_layers, adapter.d_mlp, seed=0, k=12)
    b = random_set(adapter.n_layers, adapter.d_mlp, seed=1, k=20)
    got = parameter_similarity(any_model, a, b, method=method)
    want = [numpy_cosine(adapter, layer, a, b, method) for layer in range(adapter.n_layers)]
    assert len(got) == adapter.n_layers
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert len(a & b) > 0 and all(abs(v) < 1 - 1e-6 for v in got)  # overlapping but different sets: not identical


def test_identical_sets_give_one_and_disjoint_masked_gives_zero(any_model):
    adapter = as_adapter(any_model)
    a = random_set(adapter.n_layers, adapter.d_mlp, seed=3, k=10)
    for method in ("masked", "mean"):
        np.testing.assert_allclose(parameter_similarity(any_model, a, a, method=method), 1.0, rtol=1e-12)
    disjoint = a.random_like(seed=0, exclude=a)
    np.testing.assert_allclose(parameter_similarity(any_model, a, disjoint), 0.0, atol=1e-12)
    # The mean reading compares what the neurons look like, so disjoint sets are not forced to 0.
    assert any(abs(v) > 1e-6 for v in parameter_similarity(any_model, a, disjoint, method="mean"))


def test_matrix_long_format_roles_and_empty_layers(bridge_llama):
    adapter = as_adapter(bridge_llama)
    sets = {
        "a": random_set(3, adapter.d_mlp, seed=0, k=8),
        "b": random_set(3, adapter.d_mlp, seed=1, k=8),
        "c": NeuronSet(3, adapter.d_mlp, {0: [1, 2]}),  # empty in layers 1 and 2
    }
    df = parameter_similarity_matrix(bridge_llama, sets)
    assert list(df.columns) == ["task_a", "task_b", "layer", "cosine"] and len(df) == 3 * 3 * 3
    pivot = df.pivot_table(index=["layer", "task_a"], columns="task_b", values="cosine", dropna=False)
    assert np.allclose(pivot.loc[0].values, pivot.loc[0].values.T)
    row = df[(df.task_a == "a") & (df.task_b == "b")].sort_values("layer").cosine.tolist()
    assert row == pytest.approx(parameter_similarity(bridge_llama, sets["a"], sets["b"]))
    assert all(math.isnan(v) for v in df[(df.task_a == "c") & (df.layer > 0)].cosine)

    # Roles select parameter slices: W_out alone equals the NumPy value on W_out alone.
    w_out = parameter_similarity(bridge_llama, sets["a"], sets["b"], method="mean", roles=["W_out"])
    out_matrix = neuron_parameter_matrix(bridge_llama, 1, roles=["W_out"]).numpy()
    ma, mb = (out_matrix[sets[k].indices(1).numpy()].mean(0) for k in ("a", "b"))
    assert w_out[1] == pytest.approx(ma @ mb / (np.linalg.norm(ma) * np.linalg.norm(mb)), rel=1e-10)
    assert neuron_parameter_matrix(bridge_llama, 0).shape == (adapter.d_mlp, 3 * adapter.d_model)  # gate, up, down


def test_errors(bridge_gpt2):
    adapter = as_adapter(bridge_gpt2)
    a = random_set(3, adapter.d_mlp, seed=0, k=4)
    with pytest.raises(ValueError, match="method must be one of"):
        parameter_similarity(bridge_gpt2, a, a, method="cosine")
    with pytest.raises(ValueError, match="d_mlp=8 but the model has d_mlp=128"):
        parameter_similarity(bridge_gpt2, a, NeuronSet(3, 8))
    with pytest.raises(ValueError, match="no neuron parameter role"):
        parameter_similarity(bridge_gpt2, a, a, roles=["W_gate"])
    with pytest.raises(TypeError, match="expected a NeuronSet"):
        parameter_similarity_matrix(bridge_gpt2, {"a": a, "b": [1, 2]})
