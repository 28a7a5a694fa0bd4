import numpy as np
import pytest
import torch

from tests import tiny_models
from tests.helpers import assert_model_unchanged
from tl_taskmap.activations import Activations, CallbackSink, DiskSink, capture, resolve_sites
from tl_taskmap.models import as_adapter

PROMPTS = ["the quick brown fox jumps", "a b", "good movie great", "0 1 2 + 3 = ?", "bad", "yes no maybe true"]


@pytest.mark.parametrize("reduce", ["last", "mean", 0, 1, -2])
def test_batched_equals_one_at_a_time(any_model, reduce):
    sites = ["resid_post", "mlp_post"]
    solo = [capture(any_model, [p], sites, reduce=reduce, progress=False) for p in PROMPTS]
    for side in ("left", "right"):
        acts = capture(any_model, PROMPTS, sites, reduce=reduce, batch_size=4, padding_side=side, progress=False)
        for name in acts:
            expected = torch.cat([s[name] for s in solo])
            torch.testing.assert_close(acts[name], expected, atol=1e-5, rtol=1e-5)


def test_mlp_post_fires_with_width_d_mlp(any_model):
    a = as_adapter(any_model)
    acts = capture(any_model, PROMPTS[:2], "mlp_post", progress=False)
    assert len(acts) == a.n_layers
    for name in acts:
        assert acts[name].shape == (2, a.d_mlp)
        assert acts[name].abs().sum() > 0


def test_reductions_against_manual_computation(bridge_llama):
    a = as_adapter(bridge_llama)
    batch = a.tokenize(PROMPTS[:3], padding_side="right")
    full = {}
    with a.hooks([("blocks.1.hook_resid_post", lambda x, hook: full.__setitem__("x", x.detach()))]):
        a.forward(batch)
    x, mask = full["x"], batch.attention_mask.bool()
    mean = capture(bridge_llama, PROMPTS[:3], [(1, "resid_post")], reduce="mean", padding_side="right", progress=False)
    last = capture(bridge_llama, PROMPTS[:3], [(1, "resid_post")], reduce="last", padding_side="right", progress=False)
    for i in range(3):
        torch.testing.assert_close(mean[(1, "resid_post")][i], x[i][mask[i]].mean(0))
        torch.testing.assert_close(last[(1, "resid_post")][i], x[i][mask[i]][-1])
    custom = capture(bridge_llama, PROMPTS[:3], [(1, "resid_post")], reduce=lambda acts, b: acts.amax(1), padding_side="left", progress=False)
    assert custom[(1, "resid_post")].shape == (3, 32)


def test_resid_post_matches_hf_hidden_states(bridge_llama, bridge_gpt2):
    """blocks.{i}.hook_resid_post equals HF hidden_states[i+1] (the last one is after the final norm in HF)."""
    from transformers import AutoModelForCausalLM

    for arch, bridge in (("llama", bridge_llama), ("gpt2", bridge_gpt2)):
        hf = AutoModelForCausalLM.from_pretrained(tiny_models.hf_folder(arch), attn_implementation="eager").eval()
        a = as_adapter(bridge)
        batch = a.tokenize(PROMPTS, padding_side="left")
        acts = capture(bridge, PROMPTS, "resid_post", reduce="last", progress=False)
        with torch.no_grad():
            out = hf(batch.tokens, attention_mask=batch.attention_mask, position_ids=batch.position_ids, output_hidden_states=True)
        for i in range(a.n_layers - 1):
            torch.testing.assert_close(acts[(i, "resid_post")], out.hidden_states[i + 1][:, -1], atol=1e-5, rtol=1e-5)
        final_norm = hf.model.norm if arch == "llama" else hf.transformer.ln_f
        with torch.no_grad():
            torch.testing.assert_close(final_norm(acts[(a.n_layers - 1, "resid_post")]), out.hidden_states[-1][:, -1], atol=1e-5, rtol=1e-5)


def test_exception_mid_capture_leaves_model_clean(any_model):
    a = as_adapter(any_model)
    a.forward(a.tokenize(["warm up"]))
    calls = []

    def exploding_sink_add(acts, start):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with assert_model_unchanged(any_model), pytest.raises(KeyboardInterrupt):
        capture(any_model, PROMPTS, "resid_post", batch_size=2, sink=CallbackSink(exploding_sink_add), progress=False)

    def bad_reduce(acts, batch):
        raise ValueError("reduce failed inside the hook")

    with assert_model_unchanged(any_model), pytest.raises(ValueError, match="inside the hook"):
        capture(any_model, PROMPTS, "resid_post", reduce=bad_reduce, progress=False)


def test_capture_inside_user_hooks_context(bridge_llama):
    calls = []
    with bridge_llama.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: calls.append(1))]):
        capture(bridge_llama, PROMPTS[:2], [(0, "resid_post")], progress=False)
        n = len(calls)
        assert n >= 1
        bridge_llama(bridge_llama.to_tokens("a b"))
        assert len(calls) == n + 1  # the user's hook is still in place


def test_errors(any_model):
    with pytest.raises(ValueError, match="no prompts"):
        capture(any_model, [], "resid_post", progress=False)
    with pytest.raises(ValueError, match="closest valid"):
        capture(any_model, ["a"], "resid_postt", progress=False)
    with pytest.raises(ValueError, match="Closest valid hook names"):
        capture(any_model, ["a"], "blocks.0.hook_resid_pots", progress=False)
    with pytest.raises(ValueError, match="context"):
        capture(any_model, ["a b c d e f " * 30], "resid_post", progress=False)
    with pytest.raises(ValueError, match="unknown reduce"):
        capture(any_model, ["a"], "resid_post", reduce="median", progress=False)


def test_nan_activations_name_the_layer(bridge_llama):
    with torch.no_grad():
        bridge_llama.blocks[1].mlp.out._original_component.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="layer 1"):
        capture(bridge_llama, PROMPTS[:2], "resid_post", progress=False)


def test_disk_sink_and_save_load(bridge_gpt2, tmp_path):
    mem = capture(bridge_gpt2, PROMPTS, "resid_post", batch_size=4, progress=False)
    disk = capture(bridge_gpt2, PROMPTS, "resid_post", batch_size=4, sink=DiskSink(tmp_path / "acts"), progress=False)
    for name in mem:
        np.testing.assert_allclose(disk[name].numpy(), mem[name].numpy())
    mem.save(tmp_path / "a.safetensors")
    back = Activations.load(tmp_path / "a.safetensors")
    assert back.sites == mem.sites
    assert torch.equal(back.stack("resid_post"), mem.stack("resid_post"))
    assert "n_examples=6" in repr(back)


def test_resolve_sites_forms(bridge_llama):
    sites = resolve_sites(bridge_llama, [(0, "neurons"), "blocks.2.hook_resid_post", (1, "mlp_out")])
    assert [s.hook_name for s in sites] == ["blocks.0.mlp.hook_post", "blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert [s.kind for s in sites] == ["mlp_post", "resid_post", "mlp_out"]


def test_accumulator_sink_matches_memory_capture(bridge_llama):
    from tl_taskmap.activations import AccumulatorSink
    from tl_taskmap.stats import StreamingCovariance

    mem = capture(bridge_llama, PROMPTS, "resid_post", batch_size=4, progress=False)
    spectra = capture(bridge_llama, PROMPTS, "resid_post", batch_size=4, sink=AccumulatorSink(lambda site, d: StreamingCovariance(d)), progress=False)
    for name, acc in spectra.items():
        expected = np.cov(mem[name].double().numpy(), rowvar=False)
        np.testing.assert_allclose(acc.covariance().cpu().numpy(), expected, atol=1e-5)


def test_too_long_prompt_fails_before_any_forward(bridge_llama):
    a = as_adapter(bridge_llama)
    calls = []
    with a.hooks([("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))]):
        with pytest.raises(ValueError, match="prompt 9 is"):
            capture(bridge_llama, PROMPTS + ["ok"] * 3 + ["a b c d e f " * 30], "resid_post", batch_size=2, progress=False)
    assert calls == []
