"""Selection methods: each score equals an independent autograd computation of its definition; shared
neurons are removed / down-weighted as defined; planted task neurons are recovered."""

from __future__ import annotations

import functools
import math
import tempfile

import numpy as np
import pytest
import torch

from tests import tiny_models
from tl_taskmap.models import as_adapter, parameter_fingerprint
from tl_taskmap.neurons.selection import (
    METHODS, contrastive_options, contrastive_scores, gradxact_scores, select_all, select_neurons, shared_neurons, specific_scores,
)
from tl_taskmap.neurons.selection_compare import compare_selections, mean_pairwise_jaccard, verdict
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task


def _mc_tasks() -> list[Task]:
    return [
        Task.from_lists("sentiment", ["great movie", "awful film", "good review"], [" positive", " negative", " positive"],
                        options=[" positive", " negative"]),
        Task.from_lists("qa", ["Question: true? Answer:", "Question: no? Answer:"], [" yes", " no"], options=[" yes", " no", " maybe"]),
        Task.from_lists("letters", ["a b c", "x y", "d e"], [" d", " z", " f"], options=[" d", " z", " f"]),
    ]


# ----------------------------------------------------------------------------- independent references
def _row_leaves(adapter, prompt: str, completion: str):
    """One unpadded row; a zero leaf added at every layer's hook_post. Returns ({layer: (leaf, act)}, mean log-prob of the completion, answer positions)."""
    batch = adapter.tokenize([prompt], [completion])
    leaves: dict[int, torch.Tensor] = {}

    def make(layer):
        def hook(act, hook):  # act + 0: the gradient w.r.t. the zero leaf is the full ∂L/∂act (every path)
            delta = torch.zeros_like(act, requires_grad=True)
            leaves[layer] = (delta, act.detach())
            return act + delta
        return hook

    names = [adapter.hook_name(layer, "mlp_post") for layer in range(adapter.n_layers)]
    with adapter.hooks([(n, make(layer)) for layer, n in enumerate(names)]):
        logits = adapter.model(batch.tokens, return_type="logits")
    n_prompt = int((~batch.target_mask[0]).sum())
    n_answer = int(batch.target_mask[0].sum())
    logprobs = torch.log_softmax(logits[0].double(), -1)
    picked = torch.stack([logprobs[n_prompt - 1 + i, batch.tokens[0, n_prompt + i]] for i in range(n_answer)])
    positions = list(range(n_prompt - 1, n_prompt - 1 + n_answer))
    return leaves, picked.mean(), positions


def _reference(model, task: Task, contrastive: bool) -> torch.Tensor:
    adapter = as_adapter(model)
    total = torch.zeros(adapter.n_layers, adapter.d_mlp, dtype=torch.float64)
    items = contrastive_options(task) if contrastive else [(e.prompt, (e.target,), 0) for e in task.examples]
    for prompt, options, label in items:
        rows = [_row_leaves(adapter, prompt, o) for o in options]
        if contrastive:
            wrong = [r[1] for j, r in enumerate(rows) if j != label]
            objective = rows[label][1] - sum(wrong) / len(wrong)
        else:
            objective = -rows[0][1]
        for layer in range(adapter.n_layers):
            grads = torch.autograd.grad(objective, [r[0][layer][0] for r in rows], retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(r[0][layer][1]) if g is None else g for g, r in zip(grads, rows)]
            if contrastive:  # |Σ over the example's rows and answer positions| (per example)
                contrib = sum((g[0, r[2]].double() * r[0][layer][1][0, r[2]].double()).sum(0) for g, r in zip(grads, rows))
                total[layer] += contrib.abs()
            else:  # Σ |g·a| over answer positions
                g, (leaves, _, pos) = grads[0], rows[0]
                total[layer] += (g[0, pos].double() * leaves[layer][1][0, pos].double()).abs().sum(0)
    return total


@pytest.mark.parametrize("method", ["gradxact", "contrastive"])
def test_scores_equal_independent_autograd(any_model, method):
    tasks = _mc_tasks()
    before = parameter_fingerprint(any_model)
    fn = gradxact_scores if method == "gradxact" else contrastive_scores
    scores = fn(any_model, tasks, batch_size=4)  # batches mix examples of different lengths (left padding)
    for task in tasks:
        ref = _reference(any_model, task, contrastive=method == "contrastive")
        assert float(ref.abs().sum()) > 0
        torch.testing.assert_close(scores[task.name], ref, rtol=2e-4, atol=1e-6)
    assert parameter_fingerprint(any_model) == before
    assert all(p.requires_grad for p in any_model.parameters())


def test_contrastive_generation_uses_matched_corrupted_target(bridge_llama):
    task = Task.from_lists("gen", ["1 + 1 =", "2 + 2 =", "3 + 3 ="], [" 2", " 4", " 2"], metric="exact_match")
    items = contrastive_options(task)
    assert items == [("1 + 1 =", (" 2", " 4"), 0), ("2 + 2 =", (" 4", " 2"), 0), ("3 + 3 =", (" 2", " 4"), 0)]
    torch.testing.assert_close(contrastive_scores(bridge_llama, [task])["gen"], _reference(bridge_llama, task, True), rtol=2e-4, atol=1e-6)
    same = Task.from_lists("same", ["a", "b"], [" x", " x"], metric="exact_match")
    with pytest.raises(ValueError, match="no matched corrupted target"):
        contrastive_scores(bridge_llama, [same])


def test_contrastive_batching_does_not_change_scores(bridge_gpt2):
    tasks = _mc_tasks()
    one, many = contrastive_scores(bridge_gpt2, tasks, batch_size=1), contrastive_scores(bridge_gpt2, tasks, batch_size=64)
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- specific and exclusive
def test_specific_formula_against_numpy():
    rng = np.random.default_rng(0)
    raw = {n: rng.gamma(1.0, size=(2, 6)) for n in "abc"}
    raw["a"][0, 0] = raw["b"][0, 0] = raw["c"][0, 0] = 0.0  # unused everywhere: score 0, not NaN
    got = specific_scores({n: torch.tensor(v) for n, v in raw.items()})
    normed = {n: v / v.sum() for n, v in raw.items()}
    total = sum(normed.values())
    for n in raw:
        expected = np.divide(normed[n] ** 2, total, out=np.zeros_like(total), where=total > 0)
        np.testing.assert_allclose(got[n].numpy(), expected, rtol=1e-12)
        # weighted against sharing: never above the normalised relevance, equal where only this task uses it
        assert (got[n].numpy() <= normed[n] + 1e-15).all()


def test_specific_weights_against_shared_neurons():
    # neuron 0: used equally by all three tasks; neuron 1: only by a; both equally relevant for a
    r = {"a": torch.tensor([[1.0, 1.0, 0.0]]), "b": torch.tensor([[1.0, 0.0, 1.0]]), "c": torch.tensor([[1.0, 0.0, 1.0]])}
    s = specific_scores(r)
    assert s["a"][0, 1] == pytest.approx(0.5) and s["a"][0, 0] == pytest.approx(0.5 * 0.5 / 1.5)
    assert NeuronSet.top_k(s["a"], 1 / 3).indices(0).tolist() == [1]
    with pytest.raises(ValueError, match="≥ 2 tasks"):
        specific_scores({"a": r["a"]})


def test_exclusive_sets_are_disjoint_from_shared(bridge_llama):
    tasks = _mc_tasks()
    base = gradxact_scores(bridge_llama, tasks)
    sel = select_neurons(bridge_llama, tasks, "exclusive", k=0.3, gradxact=base)
    top = {n: NeuronSet.top_k(v, 0.3) for n, v in base.items()}
    # independent count: a neuron is shared when ≥ max(2, ceil(3/2)) = 2 of the 3 top sets hold it
    counts: dict[tuple[int, int], int] = {}
    for s in top.values():
        for neuron in s:
            counts[neuron] = counts.get(neuron, 0) + 1
    shared = {n for n, c in counts.items() if c >= 2}
    assert shared, "the premise (some neurons are shared) must hold for the test to mean anything"
    assert set(shared_neurons(top)) == shared
    for name, neurons in sel.sets.items():
        assert set(neurons) == set(top[name]) - shared
        assert not (set(neurons) & shared)
        assert (sel.scores[name][shared_neurons(top).to_mask()] == 0).all()
    assert sel.meta["n_shared"] == len(shared)


def test_shared_threshold_two_tasks():
    a, b = NeuronSet(1, 4, {0: [0, 1]}), NeuronSet(1, 4, {0: [1, 2]})
    assert list(shared_neurons({"a": a, "b": b})) == [(0, 1)]  # in both (≥ 2), not "in one of two"


# ----------------------------------------------------------------------------- planted neurons
PAIRS = [("a", "i"), ("b", "j"), ("c", "k"), ("d", "l"), ("e", "m"), ("f", "n")]
SHARED = 6


@functools.lru_cache(maxsize=None)
def _planted_folder() -> str:
    """A one-layer Llama whose answers are set by known MLP neurons.

    Tokens are one-hot directions (plus a large constant direction that keeps the RMS norms ≈ constant);
    attention writes nothing. Neuron ``j < 6`` fires only on prompt token ``PAIRS[j][0]`` and writes its
    answer ``PAIRS[j][1]`` (task-specific: tasks A, B, C own neurons 0-1, 2-3, 4-5). Neuron 6 fires on
    every prompt and raises every answer token alike: the "answer-shaped" neuron every task uses.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_models.tokenizer()
    ids = {s: tok.encode(s, add_special_tokens=False)[0] for s in "abcdefijklmn"}
    assert all(len(tok.encode(s, add_special_tokens=False)) == 1 for s in ids)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    dim = {s: i for i, s in enumerate("abcdefijklmn")}
    junk, big = 15, 400.0
    scale = big / 4.0  # ≈ the RMS of every residual (sqrt(big² / 16))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, junk] = big
        for s, d in dim.items():
            emb[ids[s], d] = 1.0
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        mlp = model.model.layers[0].mlp
        for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            m.weight.zero_()
        for j, (p, a) in enumerate(PAIRS):
            mlp.gate_proj.weight[j, dim[p]] = mlp.up_proj.weight[j, dim[p]] = 2.0 * scale
            mlp.down_proj.weight[dim[a], j] = 3.0
            mlp.gate_proj.weight[SHARED, dim[p]] = mlp.up_proj.weight[SHARED, dim[p]] = 2.0 * scale
            mlp.down_proj.weight[dim[a], SHARED] = 3.0
        head = model.lm_head.weight
        head.zero_()
        for s in "ijklmn":
            head[ids[s], dim[s]] = 0.15 * scale
    folder = tempfile.mkdtemp(prefix="tl_taskmap_planted_", dir=tiny_models.ROOT)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _planted():
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(_planted_folder(), device="cpu")
    model.eval()
    return model


def _planted_tasks(repeat: int = 2) -> list[Task]:
    out = []
    for name, (p0, a0, p1, a1) in {"A": "aibj", "B": "ckdl", "C": "emfn"}.items():
        out.append(Task.from_lists(name, [p0, p1] * repeat, [a0, a1] * repeat, options=[a0, a1]))
    return out


def test_planted_task_neurons_are_recovered_by_the_specific_methods():
    model, tasks = _planted(), _planted_tasks()
    own = {"A": {0, 1}, "B": {2, 3}, "C": {4, 5}}
    sels = select_all(model, tasks, METHODS, k=3 / 8)
    # Premise: gradxact ranks the shared "answer-shaped" neuron first for every task.
    for name in own:
        g = sels["gradxact"].scores[name][0]
        assert int(g.argmax()) == SHARED and all(g[SHARED] > g[j] > 0 for j in own[name])
        assert SHARED in sels["gradxact"].sets[name].indices(0).tolist()
    for method in ("contrastive", "specific", "exclusive"):
        for name, neurons in own.items():
            s = sels[method].scores[name][0]
            assert all(s[j] > s[SHARED] for j in neurons), (method, name, s)
            top_two = set(NeuronSet.top_k(sels[method].scores[name], 0.25).indices(0).tolist())
            assert top_two == neurons, (method, name, top_two)
    for name, neurons in own.items():  # exclusive: the gradxact top 3 {shared, own...} minus the shared neuron
        assert set(sels["exclusive"].sets[name].indices(0).tolist()) == neurons


def test_compare_selections_on_planted_model():
    model = _planted()
    sel_tasks, eval_tasks = _planted_tasks(2), _planted_tasks(10)  # t-intervals over examples need n ≳ 20
    cmp = compare_selections(model, sel_tasks, eval_tasks, ["gradxact", "exclusive"], k=3 / 8, seeds=3, n_boot=200)
    table = cmp.table.set_index(["method", "task"])
    assert len(cmp.table) == 6 and set(cmp.summary["method"]) == {"gradxact", "exclusive"}
    # exclusive sets are each task's own two neurons: they overlap no other task's set
    assert (cmp.table.query("method == 'exclusive'")["jaccard_other"] == 0).all()
    assert (cmp.table.query("method == 'gradxact'")["jaccard_other"] > 0).all()
    # ablating a task's exclusive neurons removes its answer, the others' do not: own > other for every task
    for name in "ABC":
        row = table.loc[("exclusive", name)]
        assert row["own_drop"] > 0.4 and row["vs_other_low"] > 0 and row["loss_vs_other"] > 0
    # gradxact's sets hold the own neurons too (plus the shared one), so both separate every task here
    assert cmp.summary.set_index("method")["own_gt_other"].to_dict() == {"gradxact": 3, "exclusive": 3}
    assert cmp.verdict.startswith("most specific: ") and "3/3" in cmp.verdict
    assert mean_pairwise_jaccard(cmp.selections["exclusive"].sets) == {"A": 0.0, "B": 0.0, "C": 0.0}


def test_compare_save_load(tmp_path):
    model = _planted()
    cmp = compare_selections(model, _planted_tasks(1), _planted_tasks(1), ["specific"], k=0.25, seeds=1, n_boot=50)
    cmp.save(tmp_path)
    back = type(cmp).load(tmp_path)
    assert back.verdict == cmp.verdict and list(back.matrices) == ["specific"]
    assert back.table.shape == cmp.table.shape


# ----------------------------------------------------------------------------- user-supplied methods and errors
def test_user_supplied_scoring_function(bridge_gpt2):
    tasks = _mc_tasks()

    def by_layer_index(model, suite):
        return {t.name: torch.arange(3 * 128, dtype=torch.float64).reshape(3, 128).flip(1) for t in suite}

    sel = select_neurons(bridge_gpt2, tasks, by_layer_index, k=0.05)
    assert sel.method == "by_layer_index" and sel.sets["qa"].indices(0).tolist() == list(range(6))
    cmp = compare_selections(bridge_gpt2, tasks, tasks, [by_layer_index], k=0.05, seeds=1, n_boot=50)
    assert set(cmp.table["method"]) == {"by_layer_index"}

    with pytest.raises(ValueError, match="no scores for tasks"):
        select_neurons(bridge_gpt2, tasks, lambda m, s: {"qa": torch.zeros(3, 128)})
    with pytest.raises(ValueError, match="shape"):
        select_neurons(bridge_gpt2, tasks, lambda m, s: {t.name: torch.zeros(4) for t in s})


def test_bad_method_names_the_choices(bridge_gpt2):
    with pytest.raises(ValueError, match="unknown selection method 'grad'.*gradxact"):
        select_neurons(bridge_gpt2, _mc_tasks(), "grad")
    with pytest.raises(ValueError, match="k must be in"):
        select_neurons(bridge_gpt2, _mc_tasks(), "gradxact", k=10)


def test_verdict_states_negative_results():
    import pandas as pd

    rows = [{"method": m, "n_above_chance": 3, "own_gt_random": 0, "own_gt_other": 0, "mean_loss_vs_other": v}
            for m, v in (("gradxact", -0.1), ("specific", 0.3))]
    line = verdict(pd.DataFrame(rows))
    assert line.startswith("no method gave own > random or own > other") and line.index("specific") < line.index("gradxact")
    assert not math.isnan(rows[0]["mean_loss_vs_other"])


def test_config_and_cli_selection_option():
    from tl_taskmap.cli import build_parser, config_from_args
    from tl_taskmap.report_config import DEFAULT_SELECTION, SELECTION_METHODS, ConfigError, MapConfig

    assert SELECTION_METHODS == METHODS and MapConfig().selection == list(DEFAULT_SELECTION)
    args = build_parser().parse_args(["map", "--selection", "gradxact", "specific"])
    assert config_from_args(args).selection == ["gradxact", "specific"]
    assert config_from_args(build_parser().parse_args(["map", "--selection"])).selection == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["map", "--selection", "gradient"])
    with pytest.raises(ConfigError, match="selection must be distinct methods among"):
        MapConfig(selection=["gradxact", "gradxact"]).validate()
