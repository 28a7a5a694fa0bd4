"""Train-task vs train-random (Leng & Xiong, Table 2) and NCFT, per selection method, over several seeds.

On the embedded model (SmolLM2-135M-Instruct) and ≥ 3 multiple-choice tasks of the built-in suite, for
each seed ``s`` (which fixes the train / held-out split, the random neurons and the batch order):

A. Table 2. Per task: zero-shot held-out accuracy; fine-tune only the task's top-k neurons chosen by
   each selection method (:mod:`tl_taskmap.neurons.selection`, on the train split of all tasks), or
   the same per-layer number of random neurons (``random_like(seed)``; with per-layer top-k every
   method's set has the same counts, so one random run serves all methods except ``exclusive``),
   with identical steps / lr / data; score the held-out split.
B. NCFT (continual learning): tasks in suite order, each stage training only that task's neurons
   (sets chosen once, on the initial model, by each method); the final accuracy of every task (CL)
   and the forgetting FG.

Intervals: per method, the paired held-out accuracy difference (method − random) pooled over tasks and
seeds, with a bootstrap over examples (``tl_taskmap.evaluate.bootstrap_interval``; the statistics
branch's two-level bootstrap over examples and seeds will replace it) and a t-interval over the
(task, seed) cells. Every number is printed whatever its sign.

    python scripts/table2_ncft.py                                   # 3 tasks, 3 seeds, gradxact and specific
    python scripts/table2_ncft.py --methods gradxact,exclusive --seeds 5 --steps 20 --out table2.json
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import numpy as np
import torch

from tl_taskmap.evaluate import bootstrap_interval, evaluate_task
from tl_taskmap.neurons.masked_training import finetune
from tl_taskmap.neurons.selection import select_all
from tl_taskmap.tasks import Task

from _common import finish, pick_tasks  # scripts/_common.py


def split(task: Task, n_train: int, n_eval: int, seed: int) -> tuple[Task, Task]:
    shuffled = task.subset(seed=seed)
    if len(shuffled) < n_train + 4:
        raise SystemExit(f"task {task.name!r} has {len(task)} examples; need ≥ --n-train + 4 = {n_train + 4}")
    k = min(n_eval, len(shuffled) - n_train)
    return (Task(task.name, shuffled.examples[:n_train], task.cluster, task.metric, task.meta),
            Task(task.name, shuffled.examples[n_train:n_train + k], task.cluster, task.metric, task.meta))


def t_interval(values: list[float], alpha: float = 0.05) -> tuple[float, float]:
    if len(values) < 2:
        return (math.nan, math.nan)
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(1 - alpha / 2, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data))
    return (float(data.mean() - half), float(data.mean() + half))


def train_and_score(model: Any, train: Task, held_out: Task, neurons: Any, args: argparse.Namespace, seed: int) -> Any:
    trained = copy.deepcopy(model)
    finetune(trained, train, neurons, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed, progress=False)
    score = evaluate_task(trained, held_out, batch_size=args.eval_batch_size)
    del trained
    return score


def part_a(model: Any, tasks: list[Task], methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cells = []
    for seed in range(args.seeds):
        pairs = [split(t, args.n_train, args.n_eval, seed) for t in tasks]
        train, held_out = [p[0] for p in pairs], [p[1] for p in pairs]
        sels = select_all(model, train, methods, k=args.k, per_layer=True)
        for tr, ev in zip(train, held_out):
            zero = evaluate_task(model, ev, batch_size=args.eval_batch_size)
            cell: dict[str, Any] = {"seed": seed, "task": tr.name, "chance": ev.chance, "n_eval": len(ev),
                                    "zero_shot": zero.metric_value, "zero_shot_per_example": zero.per_example}
            randoms: dict[tuple[int, ...], Any] = {}
            for method in methods:
                neurons = sels[method].sets[tr.name]
                counts = tuple(neurons.counts_per_layer())
                if counts not in randoms:  # equal per-layer counts and seed: the same random set, trained once
                    randoms[counts] = train_and_score(model, tr, ev, neurons.random_like(seed), args, seed)
                rand = randoms[counts]
                own = train_and_score(model, tr, ev, neurons, args, seed)
                cell[method] = {"n_neurons": len(neurons), "train_task": own.metric_value, "train_random": rand.metric_value,
                                "train_task_loss": own.loss, "train_random_loss": rand.loss,
                                "diff_per_example": [a - b for a, b in zip(own.per_example, rand.per_example)]}
                print(f"  seed {seed} {tr.name:22s} {method:11s} zero-shot {zero.metric_value:.3f} | train-random "
                      f"{rand.metric_value:.3f} (loss {rand.loss:.3f}) | train-task {own.metric_value:.3f} (loss {own.loss:.3f})",
                      flush=True)
            cells.append(cell)
    summary = {}
    for method in methods:
        diffs = [d for c in cells for d in c[method]["diff_per_example"]]
        cell_diffs = [c[method]["train_task"] - c[method]["train_random"] for c in cells]
        summary[method] = {
            "zero_shot": float(np.mean([c["zero_shot"] for c in cells])),
            "train_random": float(np.mean([c[method]["train_random"] for c in cells])),
            "train_task": float(np.mean([c[method]["train_task"] for c in cells])),
            "task_minus_random": float(np.mean(cell_diffs)),
            "interval_examples": bootstrap_interval(diffs, seed=0),
            "interval_cells": t_interval(cell_diffs),
            "n_cells": len(cells), "n_examples": len(diffs),
            "wins": sum(d > 0 for d in cell_diffs), "losses": sum(d < 0 for d in cell_diffs),
        }
    return {"cells": cells, "summary": summary}


def part_b(model: Any, tasks: list[Task], methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from tl_taskmap.neurons.ncft import continual_learning

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        pairs = [split(t, args.n_train, args.n_eval, seed) for t in tasks]
        train, held_out = [p[0] for p in pairs], [p[1] for p in pairs]
        sels = select_all(model, train, methods, k=args.k, per_layer=True)
        for method in methods:
            sets = sels[method].sets
            res = continual_learning(model, train, method="ncft", select_neurons=lambda m, task, sets=sets: sets[task.name],
                                     eval_tasks=held_out, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                                     eval_batch_size=args.eval_batch_size, progress=False)
            s = res.summary()
            runs[method].append({"seed": seed, "CL": s["average_accuracy"], "FG": s["FG"], "BWT": s["BWT"], "accuracy": res.accuracy})
            print(f"  NCFT seed {seed} {method:11s} CL {s['average_accuracy']:.3f} FG {s['FG']:.1f}% BWT {s['BWT']:+.3f}", flush=True)
    summary = {}
    for method, rows in runs.items():
        cl = [r["CL"] for r in rows]
        summary[method] = {"CL": float(np.mean(cl)), "CL_interval_seeds": t_interval(cl), "FG": float(np.nanmean([r["FG"] for r in rows])),
                           "BWT": float(np.mean([r["BWT"] for r in rows]))}
    if len(methods) >= 2:
        a, b = methods[0], methods[1]
        d = [x["CL"] - y["CL"] for x, y in zip(runs[b], runs[a])]
        summary[f"{b}_minus_{a}_CL"] = {"mean": float(np.mean(d)), "interval_seeds": t_interval(d)}
    return {"runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=None, help="comma-separated suite task names (default: 3 MC tasks of distinct clusters)")
    parser.add_argument("--n-tasks", type=int, default=3)
    parser.add_argument("--methods", default="gradxact,specific", help="selection methods (comma-separated); the first is the reference")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-eval", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--k", type=float, default=0.1)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise SystemExit("--seeds must be ≥ 1")

    from tl_taskmap.embedded import load_default_model
    from tl_taskmap.suite import default_suite

    start = time.perf_counter()
    model = load_default_model(device=args.device)
    tasks = pick_tasks(default_suite(), args.tasks, args.n_tasks, require_n=True)
    methods = [m.strip() for m in args.methods.split(",")]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    print(f"model: SmolLM2-135M-Instruct | tasks: {[t.name for t in tasks]} | settings: {settings}", flush=True)
    out: dict[str, Any] = {"settings": settings, "tasks": [t.name for t in tasks]}
    if not args.skip_a:
        print(f"\nA. train the selected neurons vs the same number of random neurons ({args.steps} steps, lr {args.lr}, k {args.k})")
        out["table2"] = part_a(model, tasks, methods, args)
        for method, s in out["table2"]["summary"].items():
            lo, hi = s["interval_examples"]
            clo, chi = s["interval_cells"]
            print(f"  {method:11s} zero-shot {s['zero_shot']:.3f} | train-random {s['train_random']:.3f} | train-task "
                  f"{s['train_task']:.3f} | task − random {s['task_minus_random']:+.3f} [95% examples {lo:+.3f}, {hi:+.3f}; "
                  f"cells {clo:+.3f}, {chi:+.3f}] (n = {s['n_examples']} examples, {s['n_cells']} task×seed cells; "
                  f"task > random in {s['wins']}, < in {s['losses']})")
    if not args.skip_b:
        print(f"\nB. NCFT over {' -> '.join(t.name for t in tasks)}")
        out["ncft"] = part_b(model, tasks, methods, args)
        for method, s in out["ncft"]["summary"].items():
            print(f"  {method}: {s}")
    return finish(out, start, args.out)


if __name__ == "__main__":
    main()
