import pytest
import torch
import torch.nn.functional as F

from tests import tiny_models
from tl_taskmap.evaluate import answer_nll, evaluate_task, exact_match, greedy_generate, rouge_l, evaluate_suite, bootstrap_interval
from tl_taskmap.models import as_adapter
from tl_taskmap.tasks import Task

PROMPTS = ["the quick brown fox", "a b c", "good movie", "0 1 2 + 3 =", "bad"]
OPTIONS = [" yes", " no", " maybe true"]


def choice_task():
    return Task.from_lists("choice", PROMPTS, [OPTIONS[i % 3] for i in range(5)], options=OPTIONS, cluster="c")


def test_answer_nll_matches_manual_cross_entropy(any_model):
    a = as_adapter(any_model)
    batch = a.tokenize(PROMPTS, [" yes no", " a", " good bad", " 5", " awful"], padding_side="left")
    nll = answer_nll(a.forward(batch), batch)
    for i, (p, c) in enumerate(zip(PROMPTS, [" yes no", " a", " good bad", " 5", " awful"])):
        single = a.tokenize([p], [c])
        logits = a.forward(single)[0]
        n = int(single.target_mask.sum())
        expected = F.cross_entropy(logits[-n - 1 : -1], single.tokens[0, -n:])
        torch.testing.assert_close(nll[i], expected, atol=1e-5, rtol=1e-5)


def test_no_answer_tokens_error(bridge_llama):
    a = as_adapter(bridge_llama)
    batch = a.tokenize(["a b"])
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_nll(a.forward(batch), batch)


def test_accuracy_independent_of_batching_and_consistent_with_loss(any_model):
    task = choice_task()
    s1 = evaluate_task(any_model, task, batch_size=1)
    s4 = evaluate_task(any_model, task, batch_size=4)
    assert s1.predictions == s4.predictions
    assert s1.loss == pytest.approx(s4.loss, abs=1e-5)
    # independent check: the chosen option has the lowest mean NLL
    a = as_adapter(any_model)
    for e, pred in zip(task.examples, s1.predictions):
        b = a.tokenize([e.prompt] * 3, list(e.options))
        nll = answer_nll(a.forward(b), b)
        assert e.options[int(nll.argmin())] == pred
    assert s1.metric_value == sum(p == e.target for p, e in zip(s1.predictions, task.examples)) / 5
    assert s1.chance == pytest.approx(1 / 3)


def test_greedy_generation_matches_hf_generate(bridge_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models.hf_folder("llama")).eval()
    a = as_adapter(bridge_llama)
    outs = greedy_generate(a, PROMPTS[:3], 4)
    for p, out in zip(PROMPTS[:3], outs):
        b = a.tokenize([p])
        gen = hf.generate(b.tokens, attention_mask=b.attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ids = gen[0, b.tokens.shape[1] :].tolist()
        text = tiny_models.tokenizer().decode(ids)
        assert text.startswith(out)


def test_generation_task_scores(bridge_gpt2):
    task = Task.from_lists("gen", PROMPTS[:3], [" a", " b", " c"], metric="rouge_l")
    s = evaluate_task(bridge_gpt2, task)
    assert 0 <= s.metric_value <= 1 and s.loss > 0 and len(s.predictions) == 3
    df = evaluate_suite(bridge_gpt2, [task, choice_task()])
    assert list(df.task) == ["gen", "choice"]


def test_metrics():
    assert exact_match(" Paris ", "paris") == 1.0 and exact_match("Rome", "Paris") == 0.0
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "the dog sat") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert rouge_l("", "x") == 0.0
    lo, hi = bootstrap_interval([0, 1, 1, 0, 1, 1, 1, 0])
    assert lo < 0.625 < hi
