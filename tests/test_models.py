import pytest
import torch

from tests import tiny_models
from tl_taskmap.models import ModelAdapter, UnsupportedModelError, as_adapter


def test_sizes_and_repr(any_model):
    a = as_adapter(any_model)
    assert a.n_layers == 3 and a.d_model == 32
    assert a.d_mlp == (48 if a.gated_mlp else 128)
    assert "n_layers=3" in repr(a)


def test_unsupported_model_gets_clear_error():
    with pytest.raises(UnsupportedModelError, match="HookedTransformer or TransformerBridge"):
        ModelAdapter(torch.nn.Linear(2, 2))


def test_unknown_site_lists_close_names(any_model):
    a = as_adapter(any_model)
    with pytest.raises(ValueError, match="resid_post"):
        a.hook_name(0, "resid_pst")
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"):
        a.hook_point("blocks.0.hook_resid_pots")
    with pytest.raises(ValueError, match="out of range"):
        a.hook_name(7, "resid_post")


def test_tokenize_padding_and_targets(any_model):
    a = as_adapter(any_model)
    left = a.tokenize(["the quick brown fox", "a b"], [" yes", " no no"], padding_side="left")
    right = a.tokenize(["the quick brown fox", "a b"], [" yes", " no no"], padding_side="right")
    assert left.tokens.shape == right.tokens.shape
    # same real tokens in the same order on both sides
    for i in range(2):
        assert torch.equal(left.tokens[i][left.attention_mask[i].bool()], right.tokens[i][right.attention_mask[i].bool()])
        assert torch.equal(left.tokens[i][left.target_mask[i]], right.tokens[i][right.target_mask[i]])
    assert left.attention_mask[:, -1].all()
    assert right.attention_mask[:, 0].all()
    assert (left.target_mask <= left.attention_mask.bool()).all()
    # the completion is exactly the tokenized answer text
    tok = tiny_models.tokenizer()
    assert left.tokens[1][left.target_mask[1]].tolist() == tok.encode(" no no", add_special_tokens=False)


def test_tokenize_errors(any_model):
    a = as_adapter(any_model)
    with pytest.raises(ValueError, match="no prompts"):
        a.tokenize([])
    with pytest.raises(ValueError, match="longer than the model's context"):
        a.tokenize(["a b c d e f g h " * 20])
    with pytest.raises(ValueError, match="pair up"):
        a.tokenize(["a", "b"], [" x"])


def test_forward_padding_invariant(any_model):
    a = as_adapter(any_model)
    prompts = ["the quick brown fox jumps", "a b", "good movie"]
    solo = [a.forward(a.tokenize([p]))[0, -1] for p in prompts]
    for side in ("left", "right"):
        batch = a.tokenize(prompts, padding_side=side)
        logits = a.forward(batch)
        last = logits[torch.arange(3), batch.last_index]
        for i in range(3):
            torch.testing.assert_close(last[i], solo[i], atol=1e-5, rtol=1e-5)


def test_neuron_params_layout(any_model):
    a = as_adapter(any_model)
    params = a.neuron_params(1)
    roles = {p.role for p in params}
    assert {"W_in", "W_out"} <= roles
    assert ("W_gate" in roles) == a.gated_mlp
    for p in params:
        assert p.param.shape[p.dim] == a.d_mlp
    vecs = a.neuron_vectors(1, torch.tensor([0, 5]))
    per_neuron = sum(p.param.numel() // a.d_mlp for p in params)
    assert vecs.shape == (2, per_neuron)


def _zero_neuron_params(a, layer, j):
    with torch.no_grad():
        for p in a.neuron_params(layer):
            p.param.select(p.dim, j).zero_()


def test_neuron_params_are_the_hook_post_neurons(any_model):
    """Zeroing neuron j's parameters makes its mlp.hook_post activation zero (so the views are right)."""
    a = as_adapter(any_model)
    batch = a.tokenize(["the quick brown fox"])
    seen = {}
    with a.hooks([("blocks.1.mlp.hook_post", lambda x, hook: seen.__setitem__("a", x.detach().clone()))]):
        a.forward(batch)
    assert seen["a"][..., 3].abs().sum() > 0
    _zero_neuron_params(a, 1, 3)
    with a.hooks([("blocks.1.mlp.hook_post", lambda x, hook: seen.__setitem__("b", x.detach().clone()))]):
        a.forward(batch)
    assert torch.all(seen["b"][..., 3] == 0)
    assert torch.allclose(seen["b"][..., 4], seen["a"][..., 4])


def test_hooks_context_removes_hooks_and_keeps_user_hooks(any_model):
    a = as_adapter(any_model)
    batch = a.tokenize(["the quick brown fox"])
    a.forward(batch)  # the bridge registers internal hooks on its first pass
    user_calls = []
    with any_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: user_calls.append(1))]):
        before = sum(len(hp._forward_hooks) for hp in any_model.hook_dict.values())
        with pytest.raises(RuntimeError, match="boom"):
            with a.hooks([("blocks.0.hook_resid_post", lambda x, hook: (_ for _ in ()).throw(RuntimeError("boom")))]):
                a.forward(batch)
        after = sum(len(hp._forward_hooks) for hp in any_model.hook_dict.values())
        assert before == after
        a.forward(batch)
    assert len(user_calls) >= 2
