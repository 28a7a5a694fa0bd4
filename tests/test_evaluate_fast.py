"""The cached evaluation paths (one prompt pass for all options, KV-cache decoding) against the references."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests import tiny_models
from tl_taskmap import kv_cache
from tl_taskmap.choice_scoring import option_logprob_sums
from tl_taskmap.evaluate import answer_nll, answer_token_logprobs, evaluate_task, greedy_generate
from tl_taskmap.generation import greedy_token_ids
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.ablation import ablate
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task

# Prompts of different lengths (so padding matters) and options of one to four tokens.
PROMPTS = ["the quick brown fox jumps over", "a b", "good movie review", "0 1 2 + 3 =", "bad", "Question: true or false? Answer:"]
OPTIONS = [" yes", " no", " maybe true", " the lazy dog jumps"]


def choice_task(n=6):
    return Task.from_lists("choice", PROMPTS[:n], [OPTIONS[i % 4] for i in range(n)], options=OPTIONS, cluster="c")


def full_forward_logprob_sums(adapter, prompts, options):
    """Independent reference: one unpadded ``prompt + option`` forward per option, summed answer log-probs."""
    out = []
    for prompt, opts in zip(prompts, options):
        for opt in opts:
            batch = adapter.tokenize([prompt], [opt])
            logits = adapter.forward(batch)[0].float()
            n = int(batch.target_mask.sum())
            out.append(-F.cross_entropy(logits[-n - 1 : -1], batch.tokens[0, -n:], reduction="sum"))
    return torch.stack(out)


def assert_scores_equal(fast, slow, atol=1e-4):
    assert fast.predictions == slow.predictions and fast.per_example == slow.per_example
    assert fast.metric_value == slow.metric_value and fast.n == slow.n
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses), atol=atol, rtol=0)
    torch.testing.assert_close(torch.tensor(fast.option_scores), torch.tensor(slow.option_scores), atol=atol, rtol=0)
    assert fast.loss == pytest.approx(slow.loss, abs=atol)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_option_logprobs_equal_per_option_full_forward(any_model, padding_side):
    a = as_adapter(any_model)
    options = [OPTIONS, OPTIONS[:2], [" a"], OPTIONS[::-1], [" 5", " 6 7"], OPTIONS]
    with torch.no_grad():
        sums, counts = option_logprob_sums(a, PROMPTS, options, padding_side=padding_side)
        expected = full_forward_logprob_sums(a, PROMPTS, options)
    torch.testing.assert_close(sums, expected, atol=1e-4, rtol=0)
    tok = a.tokenizer
    assert counts.tolist() == [len(tok.encode(o, add_special_tokens=False)) for opts in options for o in opts]


def test_fast_task_score_equals_reference(any_model):
    task = choice_task()
    fast = evaluate_task(any_model, task, batch_size=4)
    slow = evaluate_task(any_model, task, batch_size=4, fast=False)
    assert_scores_equal(fast, slow)
    assert_scores_equal(evaluate_task(any_model, task, batch_size=4, scoring="sum"), evaluate_task(any_model, task, batch_size=4, scoring="sum", fast=False))
    assert len(fast.option_scores) == 6 and all(len(s) == 4 for s in fast.option_scores)


def test_fast_equals_reference_under_ablation(any_model):
    a = as_adapter(any_model)
    task = choice_task()
    scores = torch.rand(a.n_layers, a.d_mlp, generator=torch.Generator().manual_seed(0))
    neurons = NeuronSet.top_k(scores, 0.5, per_layer=False, name="half")
    base = evaluate_task(any_model, task, batch_size=3)
    for mode in ("zero", "params"):
        with ablate(any_model, neurons, mode):
            fast = evaluate_task(any_model, task, batch_size=3)
            slow = evaluate_task(any_model, task, batch_size=3, fast=False)
        assert_scores_equal(fast, slow)
        assert abs(fast.loss - base.loss) > 1e-5  # the ablation really changed the scores


def test_fast_equals_reference_under_users_own_hook(any_model):
    """A steering hook added with TransformerLens's own ``model.hooks`` context applies to both paths alike."""
    a = as_adapter(any_model)
    task = choice_task()
    direction = torch.randn(a.d_model, generator=torch.Generator().manual_seed(1))
    seen_positions = []

    def steer(resid, hook):
        seen_positions.append(resid.shape[1])
        return resid + 2.0 * direction.to(resid.dtype)

    base = evaluate_task(any_model, task, batch_size=4)
    with any_model.hooks(fwd_hooks=[(a.hook_name(1, "resid_post"), steer)]):
        fast = evaluate_task(any_model, task, batch_size=4)
        slow = evaluate_task(any_model, task, batch_size=4, fast=False)
    assert_scores_equal(fast, slow)
    assert abs(fast.loss - base.loss) > 1e-3 and seen_positions
    assert evaluate_task(any_model, task, batch_size=4).loss == pytest.approx(base.loss, abs=1e-6)  # hook gone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_is_close(bridge_llama, dtype):
    task = choice_task()
    ref = evaluate_task(bridge_llama, task, batch_size=4)
    bridge_llama.to(dtype)
    fast = evaluate_task(bridge_llama, task, batch_size=4)
    slow = evaluate_task(bridge_llama, task, batch_size=4, fast=False)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in fast.option_scores)
    # Half precision rounds differently along the two paths; both stay near the float32 scores.
    for scores in (fast, slow):
        torch.testing.assert_close(torch.tensor(scores.option_scores), torch.tensor(ref.option_scores), atol=0.1, rtol=0)


def test_hooked_transformer_half_precision_runs():
    if not tiny_models.has_hooked_transformer():
        pytest.skip("no HookedTransformer in this TransformerLens")
    model = tiny_models.hooked("llama")
    ref = evaluate_task(model, choice_task(), batch_size=4)
    model.to(torch.bfloat16)
    model.cfg.dtype = torch.bfloat16
    fast = evaluate_task(model, choice_task(), batch_size=4)
    torch.testing.assert_close(torch.tensor(fast.option_scores), torch.tensor(ref.option_scores), atol=0.1, rtol=0)


def test_cached_generation_equals_uncached(any_model):
    a = as_adapter(any_model)
    for n_new in (1, 7):
        cached = greedy_token_ids(a, PROMPTS, n_new)
        uncached = greedy_token_ids(a, PROMPTS, n_new, use_cache=False)
        assert cached == uncached
        assert max(map(len, cached)) >= 1
    assert greedy_generate(a, PROMPTS, 5) == greedy_generate(a, PROMPTS, 5, use_cache=False)
    assert greedy_token_ids(a, PROMPTS, 0) == [[] for _ in PROMPTS]


def test_cached_generation_matches_hf_generate_with_left_padding(bridge_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models.hf_folder("llama")).eval()
    a = as_adapter(bridge_llama)
    ours = greedy_token_ids(a, PROMPTS, 6)
    batch = a.tokenize(PROMPTS, padding_side="left")
    gen = hf.generate(batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tok = a.tokenizer
    for row, new in zip(gen[:, batch.tokens.shape[1] :].tolist(), ours):
        stop = [i for i, t in enumerate(row) if t == tok.eos_token_id or "\n" in tok.decode([t])]
        assert row[: stop[0] if stop else len(row)] == new


def test_generation_task_fast_equals_reference(any_model):
    task = Task.from_lists("gen", PROMPTS, [" a b", " c", " yes no", " 5", " good", " the dog"], metric="rouge_l")
    fast = evaluate_task(any_model, task, batch_size=4)
    slow = evaluate_task(any_model, task, batch_size=4, fast=False)
    assert fast.predictions == slow.predictions and fast.per_example == slow.per_example
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses), atol=1e-4, rtol=0)


def test_unfilled_cache_falls_back_to_reference(bridge_gpt2, monkeypatch):
    """A TransformerLens/transformers pair that drops the cache is detected, never trusted."""
    import contextlib

    monkeypatch.setattr(kv_cache, "_attention_sees_cache", lambda adapter: contextlib.nullcontext())
    a = as_adapter(bridge_gpt2)
    batch = a.tokenize(["a b c"])
    with pytest.raises(kv_cache.KVCacheUnsupported, match="fast=False"):
        kv_cache.forward_with_cache(a, batch.tokens, batch.attention_mask)
    task = choice_task()
    with pytest.warns(RuntimeWarning, match="falling back"):
        fast = evaluate_task(bridge_gpt2, task, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        slow = evaluate_task(bridge_gpt2, task, batch_size=4, fast=False)
    assert_scores_equal(fast, slow, atol=0)


def test_bad_options_are_named(bridge_gpt2):
    a = as_adapter(bridge_gpt2)
    with pytest.raises(ValueError, match="option 1 of example 0"):
        option_logprob_sums(a, ["a b"], [[" yes", ""]])
    with pytest.raises(ValueError, match="one list of options per prompt"):
        option_logprob_sums(a, ["a b", "c"], [[" yes"]])
    with pytest.raises(ValueError, match="context"):
        option_logprob_sums(a, ["a " * 60], [[" yes no maybe"]])


def test_answer_logprobs_and_gradients_equal_full_log_softmax(bridge_llama):
    """Log-softmax at answer positions only gives the same values and gradients as over every position."""
    a = as_adapter(bridge_llama)
    batch = a.tokenize(PROMPTS, [" yes no", " a", " good bad", " 5", " awful", " x"], padding_side="right")
    logits = a.forward(batch).detach().requires_grad_(True)
    ours = answer_token_logprobs(logits, batch)
    full = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    reference = torch.cat([torch.zeros(len(batch), 1), full], 1) * batch.target_mask
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-7, rtol=0)
    assert answer_nll(logits, batch).shape == (len(PROMPTS),)


@pytest.mark.real_model
def test_real_model_fast_equals_reference():
    from tl_taskmap import embedded

    try:
        model = embedded.load_default_model()
    except Exception as err:  # package or cache missing
        pytest.skip(f"embedded model unavailable: {err}")
    task = Task.from_lists(
        "real", ["Is the sky blue? Answer:", "Is fire cold? Answer:", "2 + 2 =", "The capital of France is"],
        [" yes", " no", " 4", " Paris"], options=[" yes", " no", " 4", " Paris"],
    )
    fast = evaluate_task(model, task, batch_size=4)
    slow = evaluate_task(model, task, batch_size=4, fast=False)
    assert_scores_equal(fast, slow)
    a = as_adapter(model)
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    assert greedy_token_ids(a, prompts, 6) == greedy_token_ids(a, prompts, 6, use_cache=False)
    # A few-shot generation task (a long shared prefix, run once per batch; targets the model follows and leaves).
    shots = "Present: walk\nPast: walked\n\nPresent: go\nPast: went\n\nPresent: "
    verbs = [("jump", " jumped"), ("eat", " ate"), ("swim", " swam"), ("allot", " allotted"), ("think", " thunk")]
    gen = Task.from_lists("past", [shots + v + "\nPast:" for v, _ in verbs], [t for _, t in verbs], metric="exact_match")
    fast, slow = evaluate_task(model, gen, batch_size=5), evaluate_task(model, gen, batch_size=5, fast=False)
    assert fast.predictions == slow.predictions and fast.per_example == slow.per_example
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses), atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_window_forward_equals_full_forward_with_gradients(any_model, padding_side):
    from tl_taskmap.evaluate import answer_window_forward

    a = as_adapter(any_model)
    batch = a.tokenize(PROMPTS, [" yes no", " a", " good bad awful", " 5", " awful", " x"], padding_side=padding_side)
    params = [p for p in any_model.parameters() if p.requires_grad]
    window_loss = answer_nll(*answer_window_forward(a, batch)).sum()
    g_window = torch.autograd.grad(window_loss, params, allow_unused=True)
    full_loss = answer_nll(a.forward(batch), batch).sum()
    g_full = torch.autograd.grad(full_loss, params, allow_unused=True)
    torch.testing.assert_close(window_loss, full_loss, atol=1e-5, rtol=0)
    for gw, gf in zip(g_window, g_full):
        if gf is not None:
            torch.testing.assert_close(gw, gf, atol=1e-5, rtol=1e-4)
    if padding_side == "left":
        logits, window = answer_window_forward(a, batch)
        assert logits.shape[1] == window.tokens.shape[1]  # the window, or the full batch where the model cannot slice
        if a.backend == "hooked" or "llama" in type(getattr(any_model, "original_model", any_model)).__name__.lower():
            assert logits.shape[1] == int(batch.target_mask.sum(1).max()) + 1 < batch.tokens.shape[1]
