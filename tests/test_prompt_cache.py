"""Shared-prefix prompt passes and the one-pass target score + greedy decoder, against plain references."""

import pytest
import torch

from tests.test_evaluate_fast import full_forward_logprob_sums
from tl_taskmap.choice_scoring import option_logprob_sums
from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.generation import greedy_token_ids, target_logprobs_and_greedy
from tl_taskmap.kv_cache import forward_with_cache
from tl_taskmap.models import as_adapter
from tl_taskmap.neurons.ablation import ablate
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.prompt_cache import MIN_SHARED_TOKENS, common_prefix_length, run_prompts
from tl_taskmap.tasks import Task

# Few-shot prompts: a long shared demonstration, then own tokens of different lengths (one of a single token).
SHOT = "the quick brown fox jumps over the lazy dog\n0 1 2\n"
FEW_SHOT = [SHOT + "a b c d", SHOT + "e", SHOT + "good movie review yes no", SHOT + "0 1 2 + 3 =", SHOT + "x y"]
OPTIONS = [" yes", " no", " maybe true", " the lazy dog jumps"]


def test_common_prefix_length():
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2]]) == 2
    assert common_prefix_length([[4, 2], [1, 2]]) == 0


def test_shared_prefix_pass_equals_plain_pass(any_model):
    a = as_adapter(any_model)
    with torch.no_grad():
        shared = run_prompts(a, FEW_SHOT)
        plain = run_prompts(a, FEW_SHOT, share_prefix=False)
        assert shared.shared >= MIN_SHARED_TOKENS and plain.shared == 0
        torch.testing.assert_close(shared.last_logits, plain.last_logits, atol=1e-4, rtol=0)
        assert shared.lengths == plain.lengths
        # Continuing both caches with the same tokens gives the same logits (positions and masks agree).
        nxt = plain.last_logits.argmax(-1)[:, None]
        cont_shared, _ = forward_with_cache(a, nxt, torch.ones_like(nxt), shared.cache)
        cont_plain, _ = forward_with_cache(a, nxt, torch.ones_like(nxt), plain.cache)
    torch.testing.assert_close(cont_shared, cont_plain, atol=1e-4, rtol=0)


def test_prompts_without_a_long_shared_prefix_run_plain(bridge_llama):
    a = as_adapter(bridge_llama)
    with torch.no_grad():
        assert run_prompts(a, ["a b c", "d e f g"]).shared == 0
        assert run_prompts(a, [SHOT + "a"]).shared == 0  # one prompt: nothing to share


def test_few_shot_option_scores_equal_full_forward(any_model):
    a = as_adapter(any_model)
    options = [OPTIONS, OPTIONS[:2], [" a"], OPTIONS[::-1], [" 5", " 6 7"]]
    with torch.no_grad():
        sums, _ = option_logprob_sums(a, FEW_SHOT, options)
        expected = full_forward_logprob_sums(a, FEW_SHOT, options)
    torch.testing.assert_close(sums, expected, atol=1e-4, rtol=0)


def _targets_that_exercise_every_branch(a, prompts):
    """Targets that greedy decoding follows to the end, follows partly, and leaves at once."""
    greedy = greedy_token_ids(a, prompts, 4, use_cache=False)
    tok = a.tokenizer
    targets = []
    for i, ids in enumerate(greedy):
        if i % 3 == 0 and ids:
            targets.append(tok.decode(ids))                       # followed to its end
        elif i % 3 == 1 and len(ids) >= 2:
            targets.append(tok.decode(ids[:1]) + " zebra")         # followed for one token, then left
        else:
            targets.append(" 9 8 7")                               # (almost surely) left at once
    return targets


@pytest.mark.parametrize("prompts", [FEW_SHOT, ["a b", "the quick brown", "0 1 2 + 3 =", "good"]], ids=["few-shot", "plain"])
def test_target_logprobs_and_greedy_equal_references(any_model, prompts):
    a = as_adapter(any_model)
    targets = _targets_that_exercise_every_branch(a, prompts)
    with torch.no_grad():
        for n_new in (0, 1, 3, 6):
            sums, counts, ids = target_logprobs_and_greedy(a, prompts, targets, n_new)
            assert ids == greedy_token_ids(a, prompts, n_new, use_cache=False)
            assert all(len(row) <= n_new for row in ids)
        ref_sums, ref_counts = option_logprob_sums(a, prompts, [[t] for t in targets], padding_side="right")
    torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=0)
    assert counts.tolist() == ref_counts.tolist()


def test_target_walk_follows_the_target_without_decoding(bridge_llama, monkeypatch):
    """A target that greedy decoding follows and then stops after needs no decoding step beyond the two passes."""
    from tl_taskmap import generation

    a = as_adapter(bridge_llama)
    with torch.no_grad():
        greedy = greedy_token_ids(a, FEW_SHOT, 8, use_cache=False)
    stopped = [i for i, ids in enumerate(greedy) if ids and len(ids) < 8]
    if not stopped:
        pytest.skip("no prompt of the tiny model stops before 8 tokens")
    prompts = [FEW_SHOT[i] for i in stopped]
    targets = [a.tokenizer.decode(greedy[i]) for i in stopped]
    calls = []
    monkeypatch.setattr(generation, "_decode_on", lambda *args, **kw: calls.append(args))
    with torch.no_grad():
        _, _, ids = target_logprobs_and_greedy(a, prompts, targets, 8)
    assert ids == [greedy[i] for i in stopped] and not calls


def test_generation_task_under_ablation_equals_reference(any_model):
    a = as_adapter(any_model)
    task = Task.from_lists("gen", FEW_SHOT, [" a b", " c", " yes no", " 5", " good"], metric="rouge_l")
    neurons = NeuronSet.top_k(torch.rand(a.n_layers, a.d_mlp, generator=torch.Generator().manual_seed(0)), 0.5, per_layer=False)
    base = evaluate_task(any_model, task, batch_size=3)
    with ablate(any_model, neurons):
        fast = evaluate_task(any_model, task, batch_size=3)
        slow = evaluate_task(any_model, task, batch_size=3, fast=False)
    assert fast.predictions == slow.predictions and fast.per_example == slow.per_example
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses), atol=1e-4, rtol=0)
    assert abs(fast.loss - base.loss) > 1e-5


def test_mismatched_targets_are_named(bridge_gpt2):
    a = as_adapter(bridge_gpt2)
    with pytest.raises(ValueError, match="one target per prompt"):
        target_logprobs_and_greedy(a, ["a", "b"], [" c"], 2)
    with pytest.raises(ValueError, match="no tokens"):
        target_logprobs_and_greedy(a, ["a"], [""], 2)


def test_bad_targets_are_refused_before_any_forward(bridge_gpt2, monkeypatch):
    from tl_taskmap import choice_scoring, generation

    a = as_adapter(bridge_gpt2)
    ran = []
    monkeypatch.setattr(generation, "run_prompts", lambda *args, **kw: ran.append(1))
    monkeypatch.setattr(choice_scoring, "run_prompts", lambda *args, **kw: ran.append(1))
    with pytest.raises(ValueError, match="context"):
        target_logprobs_and_greedy(a, ["a " * 60], [" yes no maybe"], 2)
    with pytest.raises(ValueError, match="no tokens"):
        option_logprob_sums(a, ["a b"], [[" yes", ""]])
    assert not ran
    with pytest.raises(ValueError, match="left-padded"):
        run_prompts(a, a.tokenize(["a b"], padding_side="right"))
