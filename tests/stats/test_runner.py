import math

import numpy as np
import pytest
import torch

from tests import tiny_models
from tl_taskmap.activations import capture
from tl_taskmap.models import ModelAdapter, as_adapter, hook_point_hook_counts
from tl_taskmap.stats.cka import feature_space_linear_cka
from tl_taskmap.stats.runner import compare_models
from tl_taskmap.tasks import Task

REL = 1e-8
WORDS = "the quick brown fox jumps over lazy dog a b c good bad movie review yes no".split()


def make_task(name, n, seed, cluster):
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]
    return Task.from_lists(name, prompts, [" yes"] * n, cluster=cluster)


def narrow_gpt2():
    """A 2-layer, 16-wide GPT-2 bridge sharing the tiny tokenizer: another width, depth and family."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tiny_models.ROOT / "gpt2_narrow"
    if not folder.exists():
        tok = tiny_models.tokenizer()
        torch.manual_seed(1)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(folder)
        tok.save_pretrained(folder)
    model = TransformerBridge.boot_transformers(str(folder), device="cpu")
    return model.eval()


def other_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["zebra quagga yak " * 5] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama():
    return tiny_models.bridge("llama")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_models.bridge("gpt2")


@pytest.fixture(scope="module")
def narrow():
    return narrow_gpt2()


@pytest.fixture(scope="module")
def tasks():
    return [make_task("t1", 11, 1, "c1"), make_task("t2", 9, 2, "c2")]


def count_passes(model):
    """Count forward passes with a hook on blocks.0.hook_resid_pre; returns (counter, handle)."""
    counter = {"n": 0}

    def hook(module, inputs, output):
        counter["n"] += 1

    return counter, as_adapter(model).hook_point("blocks.0.hook_resid_pre").register_forward_hook(hook)


@pytest.fixture(scope="module")
def run(llama, gpt2, narrow, tasks):
    """One compare_models run (sft, base and a control for t1 only) with forward passes counted."""
    counters, handles = zip(*(count_passes(m) for m in (llama, gpt2, narrow)))
    before = [hook_point_hook_counts(m) for m in (llama, gpt2, narrow)]
    try:
        stats = compare_models({"sft": llama, "base": gpt2}, tasks, control_models={"t1": narrow}, batch_size=4,
                               progress=False, embedding_layers=[0, 2])
    finally:
        after = [hook_point_hook_counts(m) for m in (llama, gpt2, narrow)]
        for handle in handles:
            handle.remove()
    return stats, [c["n"] for c in counters], before == after


_CAPTURED = {}


def captured(model, task):
    """Activations captured separately with capture() (the reference), cached per model and task."""
    key = (id(model), task.name)
    if key not in _CAPTURED:
        _CAPTURED[key] = (model, capture(model, task.prompts, batch_size=4, progress=False))
    return _CAPTURED[key][1]


def test_one_forward_pass_per_model_per_batch(run):
    stats, passes, hooks_clean = run
    # t1: 11 prompts → 3 batches, t2: 9 prompts → 3 batches; the control runs on t1 only.
    assert passes == [6, 6, 3]
    assert hooks_clean  # the runner leaves no hook behind


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_runner_cka_equals_dense_cka_on_captured_activations(run, llama, gpt2, tasks, estimator):
    stats = run[0]
    for task in tasks:
        a, b = captured(llama, task), captured(gpt2, task)
        expected = [feature_space_linear_cka(a[(k, "resid_post")].numpy(), b[(k, "resid_post")].numpy(),
                                             debiased=estimator == "debiased") for k in range(3)]
        np.testing.assert_allclose(stats.cka_curve(("sft", "base"), task=task.name, estimator=estimator), expected,
                                   rtol=REL, atol=0)


def test_control_model_is_paired_with_its_own_task_only(run, llama, gpt2, narrow, tasks):
    stats = run[0]
    assert stats.pairs == [("sft", "base"), ("sft", "control"), ("base", "control")]
    table = stats.cka_by_task(("sft", "control"))
    assert list(table.index) == ["t1"] and list(table.columns) == [0, 1]  # the control has 2 layers
    a, c = captured(llama, tasks[0]), captured(narrow, tasks[0])
    expected = [feature_space_linear_cka(a[(k, "resid_post")].numpy(), c[(k, "resid_post")].numpy()) for k in range(2)]
    np.testing.assert_allclose(stats.cka_curve(("sft", "control"), task="t1"), expected, rtol=REL)
    assert stats.tasks["t1"]["models"] == ["base", "control", "sft"] and "control" not in stats.tasks["t2"]["models"]
    assert stats.dims_for_99("control", task="t1").shape == (2,)
    with pytest.raises(KeyError):
        stats.dims_for_99("control", task="t2")


def test_dims_for_99_equals_svd_count_on_captured(run, llama, tasks):
    stats = run[0]
    acts = captured(llama, tasks[1])
    expected = []
    for k in range(3):
        x = acts[(k, "resid_post")].double().numpy()
        s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
        expected.append(int(np.searchsorted(np.cumsum(s), 0.99 * s.sum()) + 1))
    assert stats.dims_for_99("sft", task="t2").tolist() == expected


def test_task_means_and_samples_come_from_the_same_pass(run, llama, tasks):
    stats = run[0]
    means = [captured(llama, t)[(2, "resid_post")].double().mean(0).numpy() for t in tasks]
    cosine = means[0] @ means[1] / (np.linalg.norm(means[0]) * np.linalg.norm(means[1]))
    assert stats.task_similarity(2, model="sft").loc["t1", "t2"] == pytest.approx(cosine, rel=1e-6)
    rows = captured(llama, tasks[0])[(0, "resid_post")]
    torch.testing.assert_close(stats.samples[("t1", "sft", "resid_post", 0)], rows[stats.tasks["t1"]["sample_index"]])
    assert ("t1", "sft", "resid_post", 1) not in stats.samples  # only the chosen embedding layers


def test_self_cka_is_one_at_every_layer(llama, tasks):
    stats = compare_models({"a": llama, "b": llama}, tasks[:1], batch_size=5, progress=False, embedding_layers=None)
    for estimator in ("biased", "debiased"):
        np.testing.assert_allclose(stats.cka_curve(("a", "b"), estimator=estimator), 1.0, rtol=1e-10)


def test_different_depths_and_an_explicit_layer_map(llama, narrow, tasks):
    task = tasks[1]
    a, n = captured(llama, task), captured(narrow, task)
    default = compare_models({"deep": llama, "shallow": narrow}, task, progress=False, estimators=("biased",),
                             embedding_layers=None, batch_size=4)
    assert list(default.cka_by_task(("deep", "shallow")).columns) == [0, 1]  # layer i with layer i where both exist
    assert default.dims_for_99("deep").shape == (3,)
    mapped = compare_models({"deep": llama, "shallow": narrow}, task, progress=False, estimators=("biased",),
                            layer_map={"deep": [0, 2]}, embedding_layers=None, batch_size=4)
    expected = [feature_space_linear_cka(a[(la, "resid_post")].numpy(), n[(ln, "resid_post")].numpy())
                for la, ln in ((0, 0), (2, 1))]
    np.testing.assert_allclose(mapped.cka_curve(("deep", "shallow")), expected, rtol=REL)
    assert mapped.meta["layer_map"] == {"deep": [0, 2], "shallow": [0, 1]}


def test_several_sites_and_explicit_pairs(llama, gpt2, tasks):
    stats = compare_models({"sft": llama, "base": gpt2}, tasks[1], sites=[(1, "mlp_out"), "blocks.2.hook_resid_post"],
                           pairs=["base vs sft"], progress=False, estimators=("biased",), embedding_layers=None)
    assert stats.layers == {"mlp_out": [1], "resid_post": [2]} and stats.pairs == [("base", "sft")]
    a, b = captured(llama, tasks[1]), captured(gpt2, tasks[1])
    expected = feature_space_linear_cka(a[(2, "resid_post")].numpy(), b[(2, "resid_post")].numpy())
    assert stats.cka_curve(("sft", "base"), site="resid_post")[0] == pytest.approx(expected, rel=REL)


def test_mixed_backends(any_model, gpt2, tasks):
    task = tasks[1]
    stats = compare_models({"x": any_model, "y": gpt2}, task, progress=False, embedding_layers=None, batch_size=4)
    a, b = captured(any_model, task), captured(gpt2, task)
    expected = [feature_space_linear_cka(a[(k, "resid_post")].numpy(), b[(k, "resid_post")].numpy()) for k in range(3)]
    np.testing.assert_allclose(stats.cka_curve(("x", "y")), expected, rtol=REL)


def test_mismatched_tokenizer_is_a_clear_error(llama, gpt2, tasks):
    class OtherTokenizer(ModelAdapter):
        tokenizer = other_tokenizer()

    counter, handle = count_passes(llama)
    try:
        with pytest.raises(ValueError, match=r"models 'sft' and 'odd' tokenize prompt 0 of task 't1' differently"):
            compare_models({"sft": llama, "odd": OtherTokenizer(gpt2)}, tasks, progress=False)
    finally:
        handle.remove()
    assert counter["n"] == 0  # checked before any forward pass


def test_argument_errors(llama, gpt2, tasks):
    models = {"sft": llama, "base": gpt2}
    with pytest.raises(ValueError, match="debiased CKA estimator needs at least 4"):
        compare_models(models, make_task("tiny", 3, 0, "c"), progress=False)
    with pytest.raises(ValueError, match="not among the tasks"):
        compare_models(models, tasks, control_models={"nope": gpt2}, progress=False)
    with pytest.raises(ValueError, match="not a model here"):
        compare_models(models, tasks, pairs=[("sft", "control")], progress=False)
    with pytest.raises(ValueError, match="outside 0..2"):
        compare_models(models, tasks, layer_map={"sft": [0, 5]}, progress=False)
    with pytest.raises(ValueError, match="control models' name"):
        compare_models({"control": llama}, tasks, progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        compare_models(models, tasks, sites="resid_postt", progress=False)
    with pytest.raises(ValueError, match="estimators"):
        compare_models(models, tasks, estimators=("rbf",), progress=False)
    with pytest.raises(TypeError, match="mapping"):
        compare_models([llama, gpt2], tasks, progress=False)


def test_single_model_gives_spectra_without_pairs(gpt2, tasks):
    stats = compare_models({"base": gpt2}, tasks, progress=False, max_examples=6, embedding_layers=None)
    assert stats.pairs == [] and stats.tasks["t1"]["n_examples"] == 6
    assert stats.dims_for_99("base").shape == (3,) and not math.isnan(stats.task_similarity(0).iloc[0, 1])


def test_extra_probes_see_the_same_passes_as_capture(llama, gpt2, narrow, tasks):
    """An ActivationProbe given to compare_models keeps exactly what capture() gives, for models and controls."""
    from tl_taskmap.probes import ActivationProbe

    kept = ActivationProbe("resid_post")
    counter, handle = count_passes(llama)
    try:
        compare_models({"sft": llama, "base": gpt2}, tasks, control_models={"t1": narrow}, batch_size=4, progress=False, probes=[kept])
    finally:
        handle.remove()
    assert counter["n"] == 6  # still one forward per batch
    for name, model, task in (("sft", llama, tasks[0]), ("sft", llama, tasks[1]), ("base", gpt2, tasks[1]), ("control", narrow, tasks[0])):
        assert torch.equal(kept.result(task=task.name, model=name).stack("resid_post"), captured(model, task).stack("resid_post"))
    with pytest.raises(KeyError):
        kept.result(task="t2", model="control")
