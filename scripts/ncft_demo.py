"""Real-model demonstration of neuron-restricted fine-tuning and NCFT (issue 7, "Done means").

On the embedded default model (SmolLM2-135M-Instruct) and tasks of the built-in suite:

A. Train-Task vs Train-Random (Leng & Xiong, Table 2): per task, fine-tune only the top-k relevance
   neurons, or the same number of random neurons per layer, with identical steps / lr / data; score
   the held-out split.
B. Continual learning (Table 5): NCFT and W-NCFT (one run: W-NCFT's unmerged scores are NCFT) vs
   sequential full fine-tuning (and per-task FT with --per-task); accuracy matrices, CL, FG, BWT.

Settings are fixed up front and printed; the numbers are reported whatever their ordering.

    python scripts/ncft_demo.py                       # defaults: 3 tasks, 16 train / 20 eval examples, 20 steps, lr 1e-4
    python scripts/ncft_demo.py --tasks sst2,qqp --steps 30 --out ncft_demo.json
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import torch

from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.neurons.masked_training import finetune
from tl_taskmap.neurons.ncft import compare_methods
from tl_taskmap.tasks import Task

from _common import finish, pick_tasks  # scripts/_common.py


def prepare(tasks: list[Task], n_train: int, n_eval: int, seed: int) -> tuple[list[Task], list[Task]]:
    """Fixed, seeded train/eval subsets (disjoint)."""
    train, held_out = [], []
    for task in tasks:
        shuffled = task.subset(seed=seed)
        if len(shuffled) < n_train + 1:
            raise ValueError(f"task {task.name!r} has {len(task)} examples; need more than --n-train={n_train}")
        k = min(n_eval, len(shuffled) - n_train)
        train.append(Task(task.name, shuffled.examples[:n_train], task.cluster, task.metric, {**task.meta, "split": "train"}))
        held_out.append(Task(task.name, shuffled.examples[n_train : n_train + k], task.cluster, task.metric, {**task.meta, "split": "eval"}))
    return train, held_out


def task_vs_random(model: Any, train: list[Task], held_out: list[Task], args: argparse.Namespace) -> list[dict[str, Any]]:
    from tl_taskmap.neurons.attribution import relevance

    rows = []
    for tr, ev in zip(train, held_out):
        zero = evaluate_task(model, ev, batch_size=args.eval_batch_size)
        task_neurons = relevance(model, tr).top(args.k, per_layer=True)
        random_neurons = task_neurons.random_like(seed=args.seed)
        row: dict[str, Any] = {"task": tr.name, "chance": ev.chance, "n_eval": len(ev), "n_neurons": len(task_neurons),
                               "overlap_jaccard": task_neurons.jaccard(random_neurons),
                               "zero_shot": zero.metric_value, "zero_shot_loss": zero.loss}
        for label, neurons in (("train_task", task_neurons), ("train_random", random_neurons)):
            trained = copy.deepcopy(model)
            fit = finetune(trained, tr, neurons, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                           progress=not args.quiet)
            score = evaluate_task(trained, ev, batch_size=args.eval_batch_size)
            row[label], row[f"{label}_loss"], row[f"{label}_train_loss"] = score.metric_value, score.loss, fit.final_loss
            del trained
        rows.append(row)
        print(f"  {tr.name:24s} zero-shot {row['zero_shot']:.3f} (loss {row['zero_shot_loss']:.3f}) | "
              f"train-random {row['train_random']:.3f} ({row['train_random_loss']:.3f}) | "
              f"train-task {row['train_task']:.3f} ({row['train_task_loss']:.3f}) | final train loss random "
              f"{row['train_random_train_loss']:.3f}, task {row['train_task_train_loss']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=None, help="comma-separated suite task names (default: 3 MC tasks, distinct clusters)")
    parser.add_argument("--n-tasks", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-eval", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of every run (equal budget)")
    parser.add_argument("--lr-full", type=float, default=None, help="a different lr for full fine-tuning (default: --lr)")
    parser.add_argument("--k", type=float, default=0.1, help="share of neurons per layer (0.1 = top 10%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--per-task", action="store_true", help="also run the per-task FT upper bound (slower)")
    parser.add_argument("--skip-a", action="store_true", help="skip part A (task vs random neurons)")
    parser.add_argument("--skip-b", action="store_true", help="skip part B (continual learning)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tl_taskmap.embedded import load_default_model
    from tl_taskmap.suite import default_suite

    start = time.perf_counter()
    model = load_default_model(device=args.device)
    tasks = pick_tasks(default_suite(), args.tasks, args.n_tasks)
    train, held_out = prepare(tasks, args.n_train, args.n_eval, args.seed)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    print(f"model: SmolLM2-135M-Instruct | tasks: {[t.name for t in train]} | settings: {settings}", flush=True)
    out: dict[str, Any] = {"settings": settings, "tasks": [t.name for t in train]}

    if not args.skip_a:
        print(f"\nA. train task neurons vs the same number of random neurons (k={args.k}, {args.steps} steps, lr={args.lr}); "
              "held-out metric (answer loss)", flush=True)
        rows = task_vs_random(model, train, held_out, args)
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("zero_shot", "train_random", "train_task",
                                                                        "zero_shot_loss", "train_random_loss", "train_task_loss")}
        wins = sum(r["train_task"] > r["train_random"] for r in rows)
        loss_wins = sum(r["train_task_loss"] < r["train_random_loss"] for r in rows)
        print(f"  {'average':24s} zero-shot {mean['zero_shot']:.3f} ({mean['zero_shot_loss']:.3f}) | "
              f"train-random {mean['train_random']:.3f} ({mean['train_random_loss']:.3f}) | "
              f"train-task {mean['train_task']:.3f} ({mean['train_task_loss']:.3f})")
        train_wins = sum(r["train_task_train_loss"] < r["train_random_train_loss"] for r in rows)
        print(f"  train-task beats train-random on {wins}/{len(rows)} tasks by held-out accuracy, {loss_wins}/{len(rows)} "
              f"by held-out loss, {train_wins}/{len(rows)} by final training loss")
        out["task_vs_random"] = {"rows": rows, "mean": mean, "accuracy_wins": wins, "loss_wins": loss_wins, "train_loss_wins": train_wins}

    if not args.skip_b:
        print(f"\nB. continual learning over {' -> '.join(t.name for t in train)}", flush=True)
        common = dict(eval_tasks=held_out, k=args.k, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      eval_batch_size=args.eval_batch_size, progress=not args.quiet)
        _, results = compare_methods(model, train, methods=["ncft", "w-ncft"], lr=args.lr, **common)
        full_methods = ["seq-ft"] + (["per-task-ft"] if args.per_task else [])
        lr_full = args.lr if args.lr_full is None else args.lr_full
        _, full = compare_methods(model, train, methods=full_methods, lr=lr_full, **{**common, "evaluate_initial": False})
        results.update(full)
        out["continual"] = {}
        for method, res in results.items():
            print(f"\n  {method}: accuracy matrix (rows: task, columns: after stage)")
            print(res.accuracy_matrix.round(3).to_string().replace("\n", "\n    ").join(["    ", ""]))
            print(f"    loss after the last stage: {[round(res.loss[i][-1], 3) for i in range(len(train))]}")
            out["continual"][method] = {"summary": res.summary(), "accuracy": res.accuracy, "loss": res.loss,
                                        "initial": res.initial, "similarities": res.similarities}
        print(f"\n  zero-shot: {[round(v, 3) for v in results['ncft'].initial]}")
        print(f"  {'method':12s} {'CL (avg)':>9s} {'FG %':>8s} {'forget %':>9s} {'BWT':>8s} {'loss BWT':>9s}")
        for method, res in results.items():
            s = res.summary()
            print(f"  {method:12s} {s['average_accuracy']:9.3f} {s['FG']:8.1f} {s['forgetting_pct']:9.1f} {s['BWT']:+8.3f} {s['loss_BWT']:+9.3f}")
        ncft, seq = results["ncft"].summary(), results["seq-ft"].summary()
        less = ncft["FG"] > seq["FG"] if not (math.isnan(ncft["FG"]) or math.isnan(seq["FG"])) else None
        print(f"  NCFT forgets less than sequential full FT (higher FG): {less} (FG {ncft['FG']:.1f}% vs {seq['FG']:.1f}%, "
              f"BWT {ncft['BWT']:+.3f} vs {seq['BWT']:+.3f}; loss BWT {ncft['loss_BWT']:+.3f} vs {seq['loss_BWT']:+.3f})")
        out["ncft_forgets_less_than_seq_ft"] = less
    return finish(out, start, args.out)


if __name__ == "__main__":
    main()
