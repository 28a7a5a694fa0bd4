"""NCFT / W-NCFT / baselines: well-formed accuracy matrices, forgetting metrics against hand
computation, the W-NCFT merge (math and exact restoration), errors, and result I/O."""

import copy
import math

import numpy as np
import pytest
import torch

from tl_taskmap.models import as_adapter, parameter_fingerprint
from tl_taskmap.neurons.ncft import (
    ContinualResult,
    TaskWeightBank,
    backward_transfer,
    compare_methods,
    continual_learning,
    forgetting_fg,
    task_similarity,
)
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task


def tiny_tasks():
    sentiment = Task.from_lists("sent", ["great movie", "bad film", "good review", "awful movie", "great film", "bad review"],
                                [" positive", " negative", " positive", " negative", " positive", " negative"],
                                options=[" positive", " negative"])
    yesno = Task.from_lists("yesno", ["Question: a b Answer:", "Question: x y Answer:", "Question: 1 2 Answer:",
                                      "Question: c d Answer:", "Question: 3 4 Answer:", "Question: z q Answer:"],
                            [" yes", " no", " yes", " no", " yes", " no"], options=[" yes", " no"])
    letters = Task.from_lists("letters", ["a b c", "d e f", "g h i", "j k l", "m n o", "p q r"],
                              [" d", " g", " j", " m", " p", " s"], options=[" d", " g", " j", " m", " p", " s"])
    return [sentiment, yesno, letters]


def fixed_selector(model, task):
    """A stand-in for relevance: a different fixed pair of neurons per task, recorded with the model seen."""
    a = as_adapter(model)
    offset = {"sent": 0, "yesno": 2, "letters": 4}[task.name]
    fixed_selector.seen.append((task.name, parameter_fingerprint(model)))
    return NeuronSet(a.n_layers, a.d_mlp, {0: [offset, offset + 1], a.n_layers - 1: [offset + 1]})


fixed_selector.seen = []
FAST = dict(steps=2, lr=5e-2, batch_size=2, progress=False, select_neurons=fixed_selector)


def test_forgetting_metrics_match_hand_computation():
    a = np.array([[0.8, 0.6, 0.5], [math.nan, 0.9, 0.45], [math.nan, math.nan, 0.7]])
    fg = forgetting_fg(a)
    assert math.isnan(fg[0]) and fg[1] == pytest.approx(75.0) and fg[2] == pytest.approx((62.5 + 50.0) / 2)
    bwt = backward_transfer(a)
    assert bwt[1] == pytest.approx(-0.2) and bwt[2] == pytest.approx((-0.3 - 0.45) / 2)
    # A_i = 0 cannot be normalised by: that task is skipped, not a division by zero
    zero_first = np.array([[0.0, 0.0, 0.0], [math.nan, 0.5, 0.4], [math.nan, math.nan, 0.9]])
    assert forgetting_fg(zero_first)[2] == pytest.approx(80.0) and math.isnan(forgetting_fg(zero_first)[1])


def hand_fg_bwt(m):
    n = m.shape[0]
    fg = np.mean([m[i, n - 1] / m[i, i] for i in range(n - 1) if m[i, i] > 0]) * 100
    return fg, np.mean([m[i, n - 1] - m[i, i] for i in range(n - 1)])


def test_ncft_matrix_is_well_formed_and_only_selected_neurons_change(any_model):
    fixed_selector.seen.clear()
    base_print = parameter_fingerprint(any_model)
    res = continual_learning(any_model, tiny_tasks(), method="ncft", **FAST)
    assert parameter_fingerprint(any_model) == base_print, "copy_model=True must leave the base untouched"
    m = res.accuracy_matrix.to_numpy()
    assert m.shape == (3, 3) and list(res.accuracy_matrix.index) == ["sent", "yesno", "letters"]
    assert np.isfinite(m[np.triu_indices(3)]).all() and np.isnan(m[np.tril_indices(3, -1)]).all()
    assert ((m[np.triu_indices(3)] >= 0) & (m[np.triu_indices(3)] <= 1)).all()
    fg, bwt = hand_fg_bwt(m)
    s = res.summary()
    assert s["FG"] == pytest.approx(fg, nan_ok=True) and s["BWT"] == pytest.approx(bwt)
    losses = np.array(res.loss)
    assert s["loss_BWT"] == pytest.approx(np.mean([losses[i, 2] - losses[i, i] for i in range(2)]))
    assert res.average_accuracy == pytest.approx(m[:, -1].mean())
    assert res.n_neurons == [3, 3, 3] and len(res.train_losses) == 3 and len(res.initial) == 3
    # the selector saw the current model: stage 2's model already carries stage 1's training
    assert [name for name, _ in fixed_selector.seen] == ["sent", "yesno", "letters"]
    assert fixed_selector.seen[0][1] == base_print and fixed_selector.seen[1][1] != base_print
    # only MLP tensors of the selected layers changed in the final model
    changed = {n for n, h in parameter_fingerprint(res.model).items() if h != base_print[n]}
    assert changed and all("mlp" in n.lower() for n in changed)


def test_seq_ft_and_per_task_ft(bridge_llama):
    seq = continual_learning(bridge_llama, tiny_tasks(), method="seq-ft", evaluate_all=True, **FAST)
    assert np.isfinite(seq.accuracy_matrix.to_numpy()).all() and seq.n_neurons == [None] * 3
    base = dict(bridge_llama.named_parameters())
    assert all(not torch.equal(p, base[n]) for n, p in seq.model.named_parameters())
    per = continual_learning(bridge_llama, tiny_tasks(), method="per-task-ft", **FAST)
    m = per.accuracy_matrix.to_numpy()
    for i in range(3):
        assert (m[i, i:] == m[i, i]).all()
    assert per.summary()["BWT"] == 0 and per.summary()["FG"] == pytest.approx(100) and per.model is None


def test_w_ncft_trains_like_ncft_and_its_plain_scores_are_ncft(bridge_gpt2):
    ncft = continual_learning(bridge_gpt2, tiny_tasks(), method="ncft", **FAST)
    w = continual_learning(bridge_gpt2, tiny_tasks(), method="w-ncft", **FAST)
    assert parameter_fingerprint(w.model) == parameter_fingerprint(ncft.model)
    assert w.as_ncft().accuracy == ncft.accuracy and w.as_ncft().method == "ncft"
    # after stage 0 only one task is trained: sim = [1] and the merge is the model itself
    assert w.accuracy[0][0] == ncft.accuracy[0][0]
    for j, sims in enumerate(w.similarities):
        assert list(sims) == ["sent", "yesno", "letters"][: j + 1]
        assert all(len(v) == j + 1 and sum(v) == pytest.approx(1.0) for v in sims.values())
    per_input = continual_learning(bridge_gpt2, tiny_tasks()[:2], method="w-ncft", routing="input", temperature=0.1, **FAST)
    assert np.isfinite(per_input.accuracy_matrix.to_numpy()[np.triu_indices(2)]).all()


def test_weight_bank_merge_math_and_exact_restore(any_model):
    a = as_adapter(any_model)
    first, second = NeuronSet(a.n_layers, a.d_mlp, {0: [0, 1]}), NeuronSet(a.n_layers, a.d_mlp, {0: [1, 2]})
    original = [p.param.detach().clone() for p in a.neuron_params(0)]
    bank = TaskWeightBank(any_model)
    for neurons, delta in ((first, 1.0), (second, 10.0)):
        bank.before_stage(neurons)
        with torch.no_grad():
            for p in a.neuron_params(0):
                idx = neurons.indices(0)
                p.param.index_add_(p.dim, idx, torch.full_like(p.param.index_select(p.dim, idx), delta))
        bank.after_stage(neurons)
    trained_print = parameter_fingerprint(any_model)
    with bank.merged([0.25, 0.75]):
        for p, x in zip(a.neuron_params(0), original):
            new, x = p.param.detach().movedim(p.dim, 0), x.movedim(p.dim, 0)
            torch.testing.assert_close(new[0], x[0] + 1)
            torch.testing.assert_close(new[1], x[1] + 0.25 * 1 + 0.75 * 11)
            torch.testing.assert_close(new[2], x[2] + 0.75 * 10)
            assert torch.equal(new[3:], x[3:])
    assert parameter_fingerprint(any_model) == trained_print
    with pytest.raises(RuntimeError, match="inside"):
        with bank.merged([0.0, 1.0]):
            raise RuntimeError("inside")
    assert parameter_fingerprint(any_model) == trained_print
    with bank.merged([1.0, 0.0]):  # one-hot on stage 0: stage-0 values exactly, stage-1-only column at base
        for p, x in zip(a.neuron_params(0), original):
            new, x = p.param.detach().movedim(p.dim, 0), x.movedim(p.dim, 0)
            assert torch.equal(new[2], x[2]) and torch.equal(new[1], (x[1].double() + 1).to(x.dtype))
    with pytest.raises(ValueError, match="weights"):
        with bank.merged([0.2, 0.3, 0.5]):
            pass


def test_similarity_is_a_softmax_of_cosines():
    sim = task_similarity(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]]), temperature=0.5)
    e = math.exp(2.0)
    torch.testing.assert_close(sim, torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]], dtype=torch.float64))


def test_errors(bridge_llama):
    tasks = tiny_tasks()
    with pytest.raises(ValueError, match="appears twice.*rename"):
        continual_learning(bridge_llama, [tasks[0], tasks[1], tasks[0]], **FAST)
    with pytest.raises(ValueError, match="method"):
        continual_learning(bridge_llama, tasks, method="lora", **FAST)
    with pytest.raises(ValueError, match="same tasks"):
        continual_learning(bridge_llama, tasks, eval_tasks=tasks[::-1], **FAST)
    with pytest.raises(ValueError, match="empty"):
        continual_learning(bridge_llama, tasks, method="ncft", **{**FAST, "select_neurons": lambda m, t: NeuronSet.empty(3, 48)})


def test_result_json_round_trip_and_compare(bridge_llama, tmp_path):
    table, results = compare_methods(bridge_llama, tiny_tasks()[:2], methods=["ncft", "w-ncft", "seq-ft"], **FAST)
    assert list(table["method"]) == ["ncft", "w-ncft", "seq-ft"]
    res = results["w-ncft"]
    res.save(tmp_path / "r.json")
    back = ContinualResult.load(tmp_path / "r.json")
    assert back.accuracy_matrix.equals(res.accuracy_matrix) and back.similarities == res.similarities
    assert back.summary() == res.summary() and back.plain_accuracy == res.plain_accuracy
    assert "w-ncft" in repr(back) and "FG=" in repr(back)
    long = back.to_dataframe()
    assert len(long) == 3 and set(long.columns) >= {"task", "stage", "metric_value", "loss"}


def test_default_selector_uses_relevance(bridge_llama):
    pytest.importorskip("tl_taskmap.neurons.attribution")
    kw = {k: v for k, v in FAST.items() if k != "select_neurons"}
    res = continual_learning(bridge_llama, tiny_tasks()[:2], method="ncft", k=0.1, **kw)
    assert res.n_neurons == [3 * round(0.1 * 48)] * 2
