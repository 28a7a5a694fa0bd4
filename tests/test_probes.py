"""The probe protocol and the driver: one forward (and one backward) per model per batch feeds CKA,
spectra, relevance and a user's own probe; each result equals the probe run alone and an independent
computation; probes merge exactly and survive save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests import tiny_models
from tests.helpers import assert_model_unchanged
from tl_taskmap.activations import Capturer, capture
from tl_taskmap.driver import Driver, run_probes
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.attribution import GradXActRelevance, RelevanceProbe, relevance
from tl_taskmap.probes import ActivationProbe, MeanActivationProbe, Probe
from tl_taskmap.sites import resolve_sites
from tl_taskmap.stats.probes import CKAProbe, CovarianceProbe, TaskMeanProbe

BATCH = 3
pytestmark = pytest.mark.filterwarnings("ignore:biased CKA with n=")


class MeanNorm(Probe):
    """A user's probe: mean L2 norm of the last prompt token's activation, per model and layer."""

    def __init__(self, site="resid_post"):
        self.site = site
        self.total_, self.n_ = {}, {}

    def hook_names(self, model, adapter):
        return [s.hook_name for s in resolve_sites(adapter, self.site)]

    def update(self, batch):
        for model, acts in batch.acts.items():
            for name, x in acts.items():
                key = (model, name)
                self.total_[key] = self.total_.get(key, 0.0) + float(batch.reduce(x, "last").double().norm(dim=-1).sum())
                self.n_[key] = self.n_.get(key, 0) + len(batch)

    def result(self):
        return {key: total / self.n_[key] for key, total in self.total_.items()}


def two_models(kind):
    """The same architecture twice, the second with perturbed weights (one tokenizer)."""
    if kind.startswith("hooked") and not tiny_models.has_hooked_transformer():
        pytest.skip("this TransformerLens version has no HookedTransformer (4.x); CI covers it with 3.x")
    a, b = tiny_models.make(kind), tiny_models.make(kind)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3) if p.numel() > 1 else 0)
    return a, b


def dense_linear_cka(x, y):
    """Biased linear CKA from the full matrices (Kornblith et al. 2019), in NumPy float64."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def fresh_probes():
    return [CKAProbe(("a", "b")), CovarianceProbe(model="a"), RelevanceProbe(model="a"), MeanNorm()]


def same_result(x, y):
    if hasattr(x, "equals"):
        return x.equals(y)
    if isinstance(x, list):
        return all(torch.equal(p, q) for p, q in zip(x, y))
    return x == y


def results(probe, tasks):
    if isinstance(probe, RelevanceProbe):
        return [t for task in tasks for t in (probe.result(task=task.name).sum_abs, probe.result(task=task.name).signed_sum)]
    return probe.result()


@pytest.mark.parametrize("kind", tiny_models.MODEL_KINDS)
def test_one_pass_feeds_every_probe_and_each_equals_its_run_alone(kind, tiny_tasks, monkeypatch):
    a, b = two_models(kind)
    forwards = {"a": 0, "b": 0}
    a.register_forward_pre_hook(lambda *_: forwards.__setitem__("a", forwards["a"] + 1))
    b.register_forward_pre_hook(lambda *_: forwards.__setitem__("b", forwards["b"] + 1))
    backwards = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *args, **kw: backwards.append(1) or real_grad(*args, **kw))

    probes = fresh_probes()
    with assert_model_unchanged(a), assert_model_unchanged(b):
        driver = Driver({"a": a, "b": b}, probes, batch_size=BATCH)
        driver.run(tiny_tasks)
    n_batches = sum(math.ceil(len(t) / BATCH) for t in tiny_tasks)
    assert forwards == {"a": n_batches, "b": n_batches} == driver.n_forward
    assert len(backwards) == n_batches and driver.n_backward == {"a": n_batches}

    for together, alone in zip(probes, fresh_probes()):
        Driver({"a": a, "b": b}, [alone], batch_size=BATCH, include_targets=True).run(tiny_tasks)
        assert same_result(results(together, tiny_tasks), results(alone, tiny_tasks)), type(alone).__name__

    # Independent references: dense CKA, relevance(), NumPy spectra, norms of captured activations.
    cka, cov, rel, norms = probes
    table = cka.result()
    norm_sums = {}
    for task in tiny_tasks:
        xa = capture(a, task.prompts, "resid_post", batch_size=BATCH, progress=False)
        xb = capture(b, task.prompts, "resid_post", batch_size=BATCH, progress=False)
        for layer in range(as_adapter(a).n_layers):
            row = table[(table.task == task.name) & (table.layer == layer)].iloc[0]
            expected = dense_linear_cka(xa["resid_post", layer].double().numpy(), xb["resid_post", layer].double().numpy())
            assert row.n == len(task) and row.cka_biased == pytest.approx(expected, rel=1e-6)
            name = f"blocks.{layer}.hook_resid_post"
            norm_sums[name] = norm_sums.get(name, 0.0) + float(xa[name].double().norm(dim=-1).sum())
            eigs = np.linalg.eigvalsh(np.cov(xa[name].double().numpy(), rowvar=False))
            torch.testing.assert_close(cov.eigenvalues(task.name, "a", name).sort(descending=True).values[: len(task) - 1],
                                       torch.from_numpy(eigs[::-1].copy())[: len(task) - 1], atol=1e-6, rtol=1e-5)
        reference = relevance(a, task, batch_size=BATCH)
        torch.testing.assert_close(rel.result(task=task.name).sum_abs, reference.sum_abs, rtol=1e-6, atol=1e-9)
    n_examples = sum(len(t) for t in tiny_tasks)
    for name, total in norm_sums.items():
        assert norms.result()[("a", name)] == pytest.approx(total / n_examples, rel=1e-6)


def test_probes_merge_exactly_and_round_trip_through_files(tiny_tasks, tmp_path):
    a, b = two_models("bridge-llama")
    whole = Driver({"a": a, "b": b}, fresh_probes()[:3] + [ActivationProbe(model="b"), TaskMeanProbe(), MeanActivationProbe(model="a")],
                   batch_size=BATCH).run(tiny_tasks)
    first = Driver({"a": a, "b": b}, [p.empty_copy() for p in whole], batch_size=BATCH).run([tiny_tasks["sentiment"]])
    second = Driver({"a": a, "b": b}, [p.empty_copy() for p in whole], batch_size=BATCH).run([tiny_tasks["qa"]])
    for w, x, y in zip(whole, first, second):
        merged = x.merge(y)
        reloaded = x.empty_copy()
        merged.save(tmp_path / f"{type(x).__name__}.safetensors")
        reloaded.load(tmp_path / f"{type(x).__name__}.safetensors")
        for got in (merged, reloaded):
            if isinstance(w, (CKAProbe, CovarianceProbe)):
                assert np.allclose(w.result().select_dtypes("number"), got.result().select_dtypes("number"), rtol=1e-10), type(w)
            elif isinstance(w, RelevanceProbe):
                for t in tiny_tasks.names:
                    assert torch.equal(w.result(task=t).sum_abs, got.result(task=t).sum_abs)
            elif isinstance(w, ActivationProbe):
                for t in tiny_tasks.names:
                    assert all(torch.equal(w.result(task=t)[k], got.result(task=t)[k]) for k in w.result(task=t))
            elif isinstance(w, TaskMeanProbe):
                assert all(torch.allclose(v, got.result()[k], rtol=1e-12) for k, v in w.result().items())
            else:  # mean activations pool every task: merging is a float64 sum in another order
                torch.testing.assert_close(w.result(), got.result(), rtol=1e-6, atol=1e-7)


def test_relevance_loss_is_pluggable_and_losses_get_one_backward_each(bridge_gpt2, tiny_tasks, monkeypatch):
    task = tiny_tasks["sentiment"]
    good, bad = (as_adapter(bridge_gpt2).tokenizer.encode(w)[0] for w in (" good", " bad"))

    def margin(logits, batch):  # a contrastive loss another engineer might plug in
        last = batch.attention_mask.shape[1] - 1 - batch.target_mask.long().flip(1).argmax(1) - 1
        picked = logits[torch.arange(len(batch)), last.to(logits.device)]
        return picked[:, bad] - picked[:, good]

    backwards = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *args, **kw: backwards.append(1) or real_grad(*args, **kw))
    nll, contrastive = RelevanceProbe(), RelevanceProbe(loss_fn=margin)
    driver = Driver(bridge_gpt2, [nll, contrastive], batch_size=4)
    driver.run(task)
    assert driver.n_forward == {"model": 2} and driver.n_backward == {"model": 4} and len(backwards) == 4
    reference = GradXActRelevance(bridge_gpt2, loss_fn=margin).fit(task, batch_size=4).result_
    torch.testing.assert_close(contrastive.result().sum_abs, reference.sum_abs, rtol=0, atol=0)
    assert contrastive.result().meta["loss"].endswith("margin")
    assert not torch.allclose(contrastive.result().sum_abs, nll.result().sum_abs)


@pytest.mark.parametrize("kind", tiny_models.MODEL_KINDS)
def test_capture_stops_after_the_last_requested_layer(kind):
    if kind.startswith("hooked") and not tiny_models.has_hooked_transformer():
        pytest.skip("this TransformerLens version has no HookedTransformer (4.x); CI covers it with 3.x")
    model = tiny_models.make(kind)
    ran = []
    handles = [model.blocks[i].register_forward_pre_hook(lambda *_, i=i: ran.append(f"block {i}")) for i in range(3)]
    handles.append(model.unembed.register_forward_pre_hook(lambda *_: ran.append("unembed")))
    prompts = ["the quick brown fox", "a b", "good movie great"]
    try:
        early = capture(model, prompts, [("resid_post", 0), (0, "mlp_post")], progress=False)
        assert ran == ["block 0"]
        ran.clear()
        every = capture(model, prompts, "resid_post", progress=False)
        assert "unembed" not in ran and "block 2" in ran
        ran.clear()
        full = Capturer(model, [(0, "resid_post"), (0, "mlp_post")], stop_early=False).run_batch(prompts)
        assert "unembed" in ran
    finally:
        for h in handles:
            h.remove()
    for site, value in full.items():
        assert torch.equal(early[site.hook_name], value.float())
    assert torch.equal(every["resid_post", 0], early["resid_post", 0])


def test_activations_take_transformer_lens_keys(bridge_llama):
    acts = capture(bridge_llama, ["a b c", "the lazy dog"], "resid_post", progress=False)
    assert acts["resid_post", -1] is acts[(2, "resid_post")] is acts["blocks.2.hook_resid_post"]
    assert acts["resid_post", 1] is acts[(1, "hook_resid_post")]
    with pytest.raises(KeyError, match="no captured site"):
        acts["mlp_post", 0]
    sites = resolve_sites(bridge_llama, [("resid_post", -1), (0, "mlp_post")])
    assert [(s.layer, s.kind) for s in sites] == [(2, "resid_post"), (0, "mlp_post")]
    assert capture(bridge_llama, ["a b"], ("resid_post", -1), progress=False).sites[0].layer == 2
    neurons = capture(bridge_llama, ["a b c", "the lazy dog"], ("post", 1), progress=False)  # TL's get_act_name short name
    assert neurons.sites[0].hook_name == "blocks.1.mlp.hook_post" and neurons["post", -1] is neurons["mlp_post", 1]


def test_run_probes_face_and_errors(bridge_llama, tiny_tasks):
    acts, means = run_probes(bridge_llama, tiny_tasks["qa"].prompts, [ActivationProbe(("mlp_post", 1)), MeanActivationProbe()])
    assert acts.result()["mlp_post", 1].shape == (6, 48) and means.result().shape == (3, 48)
    assert repr(CKAProbe(("x", "y"))).startswith("CKAProbe(models=('x', 'y')")
    with pytest.raises(ValueError, match="needs target completions"):
        run_probes(bridge_llama, ["a b"], [RelevanceProbe()])
    with pytest.raises(ValueError, match="unknown reduce"):
        ActivationProbe(reduce="median")
    with pytest.raises(TypeError, match="not probes"):
        Driver(bridge_llama, [object()])
    with pytest.raises(ValueError, match="parameters differ"):
        ActivationProbe("resid_post").merge(ActivationProbe("mlp_post"))


@pytest.mark.parametrize("kind", tiny_models.MODEL_KINDS)
def test_relevance_unembeds_only_the_answer_rows_and_scores_are_unchanged(kind, tiny_tasks):
    if kind.startswith("hooked") and not tiny_models.has_hooked_transformer():
        pytest.skip("this TransformerLens version has no HookedTransformer (4.x); CI covers it with 3.x")
    model = tiny_models.make(kind)
    unembedded = []
    handle = model.unembed.register_forward_hook(lambda *_: unembedded.append(1))
    try:
        fast, full = RelevanceProbe(), RelevanceProbe()
        Driver(model, [fast], batch_size=BATCH).run(tiny_tasks)
        assert unembedded == []  # the forward stopped before the unembedding; the answer rows were unembedded alone
        Driver(model, [full], batch_size=BATCH, row_logits=False).run(tiny_tasks)
        assert unembedded
    finally:
        handle.remove()
    for task in tiny_tasks.names:
        torch.testing.assert_close(fast.result(task=task).sum_abs, full.result(task=task).sum_abs, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(fast.result(task=task).signed_sum, full.result(task=task).signed_sum, rtol=1e-4, atol=1e-8)
    with model.hooks(fwd_hooks=[("unembed.hook_out", lambda x, hook: x * 2)]):  # a user's logit hook: full logits again
        doubled = RelevanceProbe()
        Driver(model, [doubled], batch_size=BATCH).run(tiny_tasks)
    assert not torch.allclose(doubled.result(task="qa").sum_abs, full.result(task="qa").sum_abs)


def test_distributed_encoding_is_generic_over_state_dict_and_merge(bridge_llama, tiny_tasks):
    from tl_taskmap import distributed

    cka, rel = run_probes({"a": bridge_llama, "b": bridge_llama}, tiny_tasks, [CKAProbe(("a", "b")), RelevanceProbe(model="a")],
                          batch_size=4)
    for obj, template in ((cka, CKAProbe(("a", "b"))), (rel, RelevanceProbe(model="a")), (rel.result(task="qa"), None)):
        back = distributed._decode(*distributed._unpack(distributed._pack(*distributed._encode(obj))), template)
        assert type(back) is type(obj)
        if isinstance(obj, CKAProbe):
            assert back.result().equals(obj.result())
        elif isinstance(obj, RelevanceProbe):
            assert all(torch.equal(back.result(task=t).sum_abs, obj.result(task=t).sum_abs) for t in tiny_tasks.names)
        else:
            assert torch.equal(back.sum_abs, obj.sum_abs) and back.meta == obj.meta and back.n_tokens == obj.n_tokens
    with pytest.raises(TypeError, match="state_dict\\(\\) and merge\\(\\)"):
        distributed._encode(object())


@pytest.mark.real_model
def test_real_model_fast_paths_are_exact():
    """On SmolLM2-135M: relevance from the answer rows' logits equals the full-logits path, and a capture
    stopped after layer 14 equals the capture of a full forward pass."""
    from tl_taskmap.embedded import load_default_model
    from tl_taskmap.tasks import Task

    model = load_default_model()
    task = Task.from_lists("t", ["Review: a great film. Sentiment:", "Review: a dull mess. Sentiment:", "Q: 2+2=? A:",
                                 "The capital of France is"], [" positive", " negative", " 4", " Paris"])
    fast, full = RelevanceProbe(), RelevanceProbe()
    Driver(model, [fast], batch_size=4).run(task)
    Driver(model, [full], batch_size=4, row_logits=False).run(task)
    x, y = fast.result().sum_abs.flatten(), full.result().sum_abs.flatten()
    assert float(torch.corrcoef(torch.stack([x, y]))[0, 1]) >= 0.9999
    torch.testing.assert_close(x, y, rtol=1e-3, atol=2e-5 * float(y.abs().max()))  # multi-threaded BLAS sums in another order
    sites = [(layer, "resid_post") for layer in range(15)]
    early = capture(model, task.prompts, sites, progress=False)
    for site, value in Capturer(model, sites, stop_early=False).run_batch(task.prompts).items():
        assert torch.equal(early[site.hook_name], value.float())


def test_kept_vectors_do_not_pin_the_batch_activations(bridge_llama):
    """ActivationProbe keeps [n, d] vectors, not views that keep every position of each batch alive."""
    from tl_taskmap.driver import run_probes
    from tl_taskmap.probes import ActivationProbe
    from tl_taskmap.stats.spectral import StreamingCovariance

    probe = run_probes(bridge_llama, ["the quick brown fox jumps over", "a b c d e f g"], [ActivationProbe("resid_post")],
                       batch_size=2)[0]
    for chunks in probe.chunks_.values():
        for _, reduced in chunks:
            for t in reduced.values():
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    acts = torch.randn(4, 30, 8, dtype=torch.float64)
    cov = StreamingCovariance(8).add(acts[:, -1])  # kept as rows (n <= d): a compact copy, not the [4, 30, 8] storage
    (rows,) = cov._pending[0]
    assert rows.untyped_storage().nbytes() == 4 * 8 * 8
