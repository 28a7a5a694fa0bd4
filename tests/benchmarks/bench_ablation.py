"""Benchmark: cost of the task × task ablation matrix relative to plain evaluation passes.

The matrix for T tasks and T task sets with ``seeds`` random sets each (R = T·seeds random rows)
costs (T + R) × T ablated evaluation passes plus T baseline passes. This script times one plain
``evaluate_task`` pass per task and the whole ``ablation_matrix`` call (medians after a warm-up) and
reports the wall time per cell, and per evaluation pass actually run, relative to one plain pass
(target ≤ 1.1×). It also times single passes inside ``ablate`` for each mode.

Self-contained: a small random LLaMA-shaped Hugging Face model and a BPE tokenizer are built in a
temporary folder and loaded with ``TransformerBridge.boot_transformers``; tasks come from
``Task.from_lists``. Task sets are a global top-k of random scores, so their per-layer counts differ
and no random set is shared between rows (every nominal cell is really evaluated).

    python tests/benchmarks/bench_ablation.py --tasks 3 --seeds 5 --examples 8
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.models import as_adapter, hook_point_hook_counts
from tl_taskmap.neurons.ablation import ablate, mean_activations
from tl_taskmap.neurons.sets import NeuronSet
from tl_taskmap.tasks import Task

# `tl_taskmap.neurons.ablation_effects` is also the re-exported function: fetch the module itself.
matrix_module = importlib.import_module("tl_taskmap.neurons.ablation_effects")

WORDS = "the a quick brown fox jumps over lazy dog good bad movie review great awful yes no maybe true false cat sat mat".split()


def build_model(folder: Path, d_model: int, d_mlp: int, n_layers: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformer_lens.model_bridge import TransformerBridge

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    model = TransformerBridge.boot_transformers(str(folder), device="cpu")
    model.eval()
    return model


def make_tasks(n_tasks: int, n_examples: int) -> list[Task]:
    gen = torch.Generator().manual_seed(1)
    tasks = []
    for t in range(n_tasks):
        options = [" yes", " no"] if t % 2 == 0 else [" good", " bad", " maybe"]
        prompts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6 + t,), generator=gen)) for _ in range(n_examples)]
        targets = [options[i % len(options)] for i in range(n_examples)]
        tasks.append(Task.from_lists(f"task{t}", prompts, targets, options=options))
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, help="T: tasks (and task sets)")
    parser.add_argument("--seeds", type=int, default=5, help="random sets per task set (R = T * seeds)")
    parser.add_argument("--examples", type=int, default=8, help="examples per task")
    parser.add_argument("--fraction", type=float, default=0.1, help="top-k fraction of neurons per task set")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-mlp", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the matrix (after one warm-up)")
    parser.add_argument("--plain-sweeps", type=int, default=3, help="plain passes per task before each matrix run")
    parser.add_argument("--forwards", type=int, default=30, help="interleaved forward passes for the per-forward hook cost")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_ablation_") as tmp:
        model = build_model(Path(tmp) / "llama", args.d_model, args.d_mlp, args.layers)
    adapter = as_adapter(model)
    tasks = make_tasks(args.tasks, args.examples)
    gen = torch.Generator().manual_seed(0)
    sets = {t.name: NeuronSet.top_k(torch.rand(adapter.n_layers, adapter.d_mlp, generator=gen), args.fraction, per_layer=False, name=t.name)
            for t in tasks}
    T, R = args.tasks, args.tasks * args.seeds
    cells = (T + R) * T
    print(f"model: {adapter}")
    print(f"T={T} tasks x {args.examples} examples, R={R} random sets ({args.seeds} seeds), {cells} cells, "
          f"neurons per set {[len(s) for s in sets.values()]}, torch threads={torch.get_num_threads()}")

    kwargs = dict(batch_size=args.batch_size)
    for task in tasks:  # warm-up
        evaluate_task(model, task, **kwargs)

    means = mean_activations(model, tasks[0])
    task, neurons = tasks[0], sets[tasks[0].name]
    batch = adapter.tokenize(task.prompts[: args.batch_size], task.targets[: args.batch_size])
    forward: dict[str, list[float]] = {"plain": [], "zero": []}
    with torch.no_grad():
        for _ in range(args.forwards):
            with Timer() as timer:
                adapter.forward(batch)
            forward["plain"].append(timer.cpu)
            with ablate(model, neurons):  # entering the context is not timed here
                with Timer() as timer:
                    adapter.forward(batch)
            forward["zero"].append(timer.cpu)
    ratio = statistics.median(forward["zero"]) / statistics.median(forward["plain"])
    print(f"\none forward pass with the ablation hooks on vs off ({args.forwards} interleaved, median CPU time): "
          f"{statistics.median(forward['plain']) * 1e3:.1f} ms plain, {ratio:5.3f}x with hooks")
    print("\none evaluation pass inside ablate (interleaved runs, medians; ratio to plain: wall, CPU):")
    per_mode: dict[str, list[tuple[float, float]]] = {m: [] for m in ("plain", "zero", "mean", "params")}
    for _ in range(2 * args.repeats + 1):
        for mode in per_mode:
            with Timer() as timer:
                if mode == "plain":
                    evaluate_task(model, task, **kwargs)
                else:
                    with ablate(model, neurons, mode, mean_activations=means if mode == "mean" else None):  # type: ignore[arg-type]
                        evaluate_task(model, task, **kwargs)
            per_mode[mode].append((timer.wall, timer.cpu))
    base_wall = statistics.median(w for w, _ in per_mode["plain"])
    base_cpu = statistics.median(c for _, c in per_mode["plain"])
    for mode, times in per_mode.items():
        wall, cpu = statistics.median(w for w, _ in times), statistics.median(c for _, c in times)
        print(f"  {mode:<7} {wall * 1e3:8.1f} ms  {wall / base_wall:5.3f}x wall  {cpu / base_cpu:5.3f}x CPU")

    # Plain sweeps and matrix runs alternate, so a drifting load on a shared machine hits both alike.
    # Inside the matrix every evaluate_task call is timed too: its baselines are plain passes, the
    # rest ablated passes, and wall − Σ passes is the matrix's own overhead (contexts, random sets).
    plain: dict[str, list[float]] = {t.name: [] for t in tasks}
    ablated: dict[str, list[float]] = {t.name: [] for t in tasks}
    walls, outside = [], []
    clean_hooks = hook_point_hook_counts(model)
    real_evaluate = matrix_module.evaluate_task

    instrumentation = [0.0]

    def timed_evaluate(m, task, **kw):
        start = time.perf_counter()
        score = real_evaluate(m, task, **kw)
        stop = time.perf_counter()
        (ablated if hook_point_hook_counts(model) != clean_hooks else plain)[task.name].append(stop - start)
        instrumentation[0] += time.perf_counter() - stop  # the hook count is ours, not the matrix's
        return score

    matrix_module.evaluate_task = timed_evaluate
    try:
        for repeat in range(args.repeats + 1):
            for _ in range(args.plain_sweeps):
                for task in tasks:
                    with Timer() as sweep:
                        evaluate_task(model, task, **kwargs)
                    plain[task.name].append(sweep.wall)
            n_before = sum(map(len, plain.values())) + sum(map(len, ablated.values()))
            passes_before = sum(map(sum, plain.values())) + sum(map(sum, ablated.values()))
            instrumentation[0] = 0.0
            with Timer() as run:
                matrix = matrix_module.ablation_matrix(model, tasks, sets, seeds=args.seeds, progress=False, **kwargs)
            passes = sum(map(sum, plain.values())) + sum(map(sum, ablated.values())) - passes_before
            assert sum(map(len, plain.values())) + sum(map(len, ablated.values())) - n_before == matrix.meta["n_evaluations"]
            if repeat == 0:  # warm-up round
                plain = {k: [] for k in plain}
                ablated = {k: [] for k in ablated}
                continue
            walls.append(run.wall)
            outside.append(run.wall - passes - instrumentation[0])
    finally:
        matrix_module.evaluate_task = real_evaluate
    n_eval = matrix.meta["n_evaluations"]
    plain_pass = statistics.mean(statistics.median(v) for v in plain.values())
    wall = statistics.median(walls)
    print(f"\nablation matrix (mode=zero): median wall {wall:.2f} s over {args.repeats} runs; "
          f"{n_eval} evaluation passes = {cells} cells + {T} baselines")
    print("  pass times inside the matrix run, medians per task (ablated vs plain, plain incl. the matrix's baselines):")
    for name in plain:
        a, p = statistics.median(ablated[name]), statistics.median(plain[name])
        print(f"    {name}: ablated {a * 1e3:7.1f} ms, plain {p * 1e3:7.1f} ms ({len(plain[name])} runs)  {a / p:5.3f}x")
    print(f"  time outside evaluation passes: {statistics.median(outside) * 1e3:.1f} ms per matrix "
          f"({statistics.median(outside) / wall:.2%} of the wall time)")
    print(f"  plain evaluation pass (mean over tasks of medians): {plain_pass * 1e3:.1f} ms")
    print(f"  per cell (baselines included):    {wall / cells * 1e3:7.1f} ms  {wall / cells / plain_pass:5.3f}x one plain pass (target <= 1.1x)")
    print(f"  per evaluation pass actually run: {wall / n_eval * 1e3:7.1f} ms  {wall / n_eval / plain_pass:5.3f}x one plain pass")

class Timer:
    """Wall and process CPU time of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

if __name__ == "__main__":
    main()
