"""The baseline table: zero-shot scores of the default model on the default suite.

``python -m tl_taskmap.zero_shot`` prints, per task: cluster, number of examples, metric, score,
chance, answer loss, whether the score is above chance (one-sided binomial test at 5% for
multiple choice; any exact match for generation, whose chance is ~0) and whether the task is a
control kept at chance on purpose. Runs offline after ``python -m tl_taskmap.setup_assets``.

Example:
    $ python -m tl_taskmap.zero_shot --split eval
    >>> from tl_taskmap.zero_shot import zero_shot_table
    >>> table = zero_shot_table(model, suite)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional, Sequence

from tl_taskmap.evaluate import evaluate_task
from tl_taskmap.tasks import TaskSuite


def above_chance(score: float, n: int, chance: Optional[float], *, alpha: float = 0.05) -> bool:
    """Whether ``score`` on ``n`` examples beats ``chance`` (binomial test; generation: any hit).

    Example:
        >>> above_chance(0.75, 32, 0.5), above_chance(0.55, 32, 0.5)
        (True, False)
    """
    if chance is None:
        return score > 0
    from scipy.stats import binomtest

    return bool(binomtest(round(score * n), n, chance, alternative="greater").pvalue < alpha)


def zero_shot_table(model: Any, suite: TaskSuite, *, batch_size: int = 8, scoring: str = "mean", progress: bool = False) -> Any:
    """Score every task of ``suite``; returns a pandas DataFrame (one row per task).

    Example:
        >>> zero_shot_table(model, default_suite(split="eval"))   # doctest: +SKIP
    """
    import pandas as pd

    rows = []
    for task in suite:
        start = time.perf_counter()
        score = evaluate_task(model, task, batch_size=batch_size, scoring=scoring)  # type: ignore[arg-type]
        rows.append({
            "task": task.name, "cluster": task.cluster, "n": score.n, "metric": score.metric, "score": round(score.metric_value, 3),
            "chance": None if score.chance is None else round(score.chance, 3), "loss": round(score.loss, 3),
            "above_chance": above_chance(score.metric_value, score.n, score.chance),
            "control": bool(task.meta.get("control", False)), "chat_template": bool(task.meta.get("chat_template", False)),
            "seconds": round(time.perf_counter() - start, 1),
        })
        if progress:
            print(f"  {task.name}: {score}", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: load the default model and suite, print the table.

    Example:
        >>> main(["--split", "eval", "--tasks", "word_sentiment"])   # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="python -m tl_taskmap.zero_shot", description="Zero-shot accuracy of the default model on the default suite.")
    parser.add_argument("--split", choices=["all", "train", "eval"], default="all", help="which examples of each task (default: all)")
    parser.add_argument("--max-examples", type=int, default=64, help="examples per task before the split (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--scoring", choices=["mean", "sum"], default="mean", help="option log-likelihood: per-token mean or sum")
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = parser.parse_args(argv)

    from tl_taskmap.embedded import load_default_model
    from tl_taskmap.suite import default_suite

    start = time.perf_counter()
    model = load_default_model()
    print(f"model loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    suite = default_suite(max_examples=args.max_examples, split=None if args.split == "all" else args.split, seed=args.seed,
                          chat_template=args.chat, model_or_tokenizer=model, names=args.tasks)
    table = zero_shot_table(model, suite, batch_size=args.batch_size, scoring=args.scoring, progress=True)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["seconds", "chat_template"]).to_string(index=False))
    judged = table[~table["control"]]
    print(f"\n{int(judged['above_chance'].sum())} of {len(judged)} non-control tasks above chance "
          f"({int(table['above_chance'].sum())} of {len(table)} with controls); prompts: {'chat template' if args.chat else 'raw'}, "
          f"scoring: {args.scoring}; {table['seconds'].sum():.0f} s")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
