"""Head relevance (tl_taskmap.neurons.head_attribution) against an independent per-head autograd computation.

The reference multiplies each layer's per-head output by a gate of ones ``s[b, t, h]`` and takes
``∂L_i/∂s`` — by the chain rule exactly ``Σ_d ∂L_i/∂z · z`` — one layer and one example at a time,
then applies the counted positions and the aggregate by hand. Models: both backends, GPT-2 style and
gated LLaMA style with grouped-query attention (the bridge LLaMA has 4 query / 2 KV heads; a hooked GQA
model is built here), and the embedded SmolLM2 (9 query / 3 KV heads) under ``real_model``.
"""

from __future__ import annotations

import pytest
import torch

from tests import tiny_models
from tests.neurons.test_relevance import make_task, reference_masks
from tl_taskmap.evaluate import answer_batches, answer_nll
from tl_taskmap.models import as_adapter, hook_point_hook_counts, parameter_fingerprint
from tl_taskmap.neurons.head_attribution import (
    GradXActHeadRelevance, HeadRelevanceScores, head_relevance, head_relevance_by_task, relevance_with_heads,
)
from tl_taskmap.neurons.heads import head_layout, split_heads
from tl_taskmap.neurons.attribution import GradXActRelevance, RelevanceScores, relevance
from tl_taskmap.neurons.sets import HeadSet


def hooked_gqa():
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, n_key_value_heads=2, d_vocab=len(tiny_models.tokenizer()),
                                  d_mlp=48, act_fn="silu", normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
                                  rotary_dim=8, seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(str(tiny_models.hf_folder("llama"))))
    model.eval()
    return model


HEAD_MODEL_KINDS = [*tiny_models.MODEL_KINDS, "hooked-gqa"]


@pytest.fixture(params=HEAD_MODEL_KINDS)
def head_model(request):
    """Every tiny model, plus a HookedTransformer with grouped-query attention."""
    kind = request.param
    if kind.startswith("hooked") and not tiny_models.has_hooked_transformer():
        pytest.skip("this TransformerLens version has no HookedTransformer (4.x)")
    return hooked_gqa() if kind == "hooked-gqa" else tiny_models.make(kind)


def reference_head_relevance(model, batches, layers=None):
    """positions -> (Σ|Σ_d g·z|, Σ Σ_d g·z) [n_layers, n_heads] float64, one layer and one example at a time."""
    adapter = as_adapter(model)
    lay = head_layout(model)
    out = {k: (torch.zeros(lay.n_layers, lay.n_heads, dtype=torch.float64), torch.zeros(lay.n_layers, lay.n_heads, dtype=torch.float64))
           for k in ("answer", "prompt", "all", "last_prompt")}
    for layer in (range(lay.n_layers) if layers is None else layers):
        for batch in batches:
            store = {}

            def gate(z, hook):
                per_head = split_heads(z, lay.n_heads, lay.d_head)
                store["gate"] = torch.ones(per_head.shape[:-1], requires_grad=True)
                return (per_head * store["gate"][..., None]).reshape(z.shape)

            with torch.enable_grad(), adapter.hooks([(f"blocks.{layer}.attn.hook_z", gate)]):
                losses = answer_nll(adapter.forward(batch), batch)
            masks = reference_masks(batch)
            for i in range(len(batch)):
                (grad,) = torch.autograd.grad(losses[i], store["gate"], retain_graph=True)
                contrib = grad[i].double()  # [pos, n_heads]
                for key, mask in masks.items():
                    out[key][0][layer] += contrib[mask[i]].abs().sum(0)
                    out[key][1][layer] += contrib[mask[i]].sum(0)
    return out


def assert_close_rel(actual, expected, tol=1e-5):
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((actual - expected).abs().max()) <= tol * scale, (actual, expected)


@pytest.mark.parametrize("positions", ["answer", "prompt", "all", "last_prompt"])
def test_matches_independent_per_head_autograd(head_model, positions):
    task = make_task(n=4)
    adapter = as_adapter(head_model)
    batches = list(answer_batches(adapter, task, 2))
    ref = reference_head_relevance(head_model, batches)[positions]
    for aggregate in ("sum_abs", "abs_sum"):
        est = GradXActHeadRelevance(head_model, positions=positions, aggregate=aggregate).fit(task, batch_size=2)
        assert_close_rel(est.result_.sum_abs, ref[0])
        assert_close_rel(est.result_.signed_sum, ref[1])
        expected = ref[0] if aggregate == "sum_abs" else ref[1].abs()
        assert_close_rel(est.result_.scores, expected)
        assert est.result_.n_examples == 4 and est.result_.n_tokens == sum(int(reference_masks(b)[positions].sum()) for b in batches)


def test_gqa_heads_are_query_heads(bridge_llama):
    lay = head_layout(bridge_llama)
    assert (lay.n_heads, lay.n_key_value_heads) == (4, 2)
    rel = head_relevance(bridge_llama, make_task(n=3))
    assert rel.scores.shape == (3, 4) and rel.meta["n_key_value_heads"] == 2 and rel.meta["unit"] == "head"
    # Query heads sharing a K/V head still get their own scores.
    assert not torch.equal(rel.scores[:, 0], rel.scores[:, 1])


def test_one_pass_with_neurons_equals_separate_runs(head_model):
    task = make_task(n=5)
    neurons_alone = relevance(head_model, task, batch_size=2)
    heads_alone = head_relevance(head_model, task, batch_size=2)
    neurons, heads = relevance_with_heads(head_model, task, batch_size=2)
    torch.testing.assert_close(neurons.sum_abs, neurons_alone.sum_abs, rtol=1e-6, atol=0)
    torch.testing.assert_close(neurons.signed_sum, neurons_alone.signed_sum, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(heads.sum_abs, heads_alone.sum_abs, rtol=1e-6, atol=0)
    assert type(neurons) is RelevanceScores and type(heads) is HeadRelevanceScores
    assert neurons.name == heads.name == "fox" and neurons.meta["site"] == "mlp_post" and heads.meta["site"] == "attn_z"


def test_one_forward_and_backward_per_batch(bridge_gpt2):
    adapter = as_adapter(bridge_gpt2)
    calls = {"forward": 0}
    original = adapter.forward

    def counting(batch, **kwargs):
        calls["forward"] += 1
        return original(batch, **kwargs)

    adapter.forward = counting
    est = GradXActHeadRelevance(adapter, neurons=True)
    est.fit(make_task(n=5), batch_size=2)
    assert calls["forward"] == 3


def test_state_restored_and_merge_save_load(any_model, tmp_path):
    task_a, task_b = make_task("a", n=3), make_task("a", n=3, offset=2)
    before, hooks = parameter_fingerprint(any_model), hook_point_hook_counts(any_model)
    flags = [p.requires_grad for p in any_model.parameters()]
    whole = GradXActHeadRelevance(any_model).fit(list(answer_batches(as_adapter(any_model), task_a, 3))
                                                + list(answer_batches(as_adapter(any_model), task_b, 3))).result_
    merged = head_relevance(any_model, task_a, batch_size=3) + head_relevance(any_model, task_b, batch_size=3)
    assert isinstance(merged, HeadRelevanceScores)
    torch.testing.assert_close(merged.sum_abs, whole.sum_abs, rtol=1e-12, atol=0)
    assert merged.n_examples == 6
    assert parameter_fingerprint(any_model) == before and hook_point_hook_counts(any_model) == hooks
    assert [p.requires_grad for p in any_model.parameters()] == flags
    path = tmp_path / "heads.safetensors"
    merged.save(path)
    loaded = HeadRelevanceScores.load(path)
    assert torch.equal(loaded.sum_abs, merged.sum_abs) and loaded.meta == merged.meta and loaded.n_tokens == merged.n_tokens
    top = loaded.top(0.25)
    assert isinstance(top, HeadSet) and top.counts_per_layer() == [1] * top.n_layers and top.name == merged.name
    assert list(loaded.to_dataframe().columns) == ["layer", "head", "score", "first_order_delta"]
    assert abs(float(loaded.share_table().to_numpy().sum()) - 1) < 1e-9
    assert "HeadRelevanceScores(" in repr(loaded) and "n_heads=" in repr(loaded)


def test_errors(bridge_gpt2, tmp_path):
    with pytest.raises(ValueError, match="positions must be one of"):
        GradXActHeadRelevance(bridge_gpt2, positions="middle")
    rel = head_relevance(bridge_gpt2, make_task(n=2))
    neuron_rel = relevance(bridge_gpt2, make_task(n=2))
    with pytest.raises(TypeError, match="HeadRelevanceScores"):
        rel.merge(neuron_rel)
    neuron_rel.save(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="relevance of neurons, not heads"):
        HeadRelevanceScores.load(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="no examples yet"):
        HeadRelevanceScores.empty(3, 4).top(0.1)
    names = head_relevance_by_task(bridge_gpt2, [make_task("a", n=2), make_task("b", n=2)])
    assert list(names) == ["a", "b"]


def test_missing_hook_z_is_a_clear_error():
    from tl_taskmap.models import UnsupportedModelError

    model = tiny_models.make("bridge-gpt2")
    adapter = as_adapter(model)
    adapter.__dict__["_hook_name_cache"] = frozenset(n for n in model.hook_dict if "hook_z" not in n)
    with pytest.raises(UnsupportedModelError, match="attn.hook_z"):
        GradXActHeadRelevance(adapter)


@pytest.mark.real_model
def test_real_model_matches_independent_autograd():
    from tl_taskmap.embedded import load_default_model

    model = load_default_model()
    lay = head_layout(model)
    assert (lay.n_heads, lay.n_key_value_heads, lay.d_head) == (9, 3, 64)
    task = make_task(n=2)
    batches = list(answer_batches(as_adapter(model), task, 2))
    layers = [0, 14, lay.n_layers - 1]
    ref = reference_head_relevance(model, batches, layers)["answer"]
    neurons, heads = relevance_with_heads(model, task, batch_size=2)
    for layer in layers:
        assert_close_rel(heads.sum_abs[layer], ref[0][layer])
        assert_close_rel(heads.signed_sum[layer], ref[1][layer])
    torch.testing.assert_close(neurons.sum_abs, GradXActRelevance(model).fit(batches).result_.sum_abs, rtol=1e-5, atol=0)
