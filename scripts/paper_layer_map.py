"""The paper's layer map on a real pair made offline (issue 19): the embedded model (base), its multi-task
fine-tune on the suite's selection splits (tuned), single-task controls and null controls.

Prints, per task: the multi-task model's held-out metric beside the base's; the section rule's output for the
real pair and for the null pair (with its thresholds); the layers whose gain survives the null, with intervals.

    nice -n 10 python scripts/paper_layer_map.py --examples 48 --multitask-steps 60 --out /tmp/paper_map

Everything is written to ``--out`` (the multi-task model is cached there, content-addressed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    from tl_taskmap.embedded import load_default_model
    from tl_taskmap.report.layer_map import build_layer_map, read_layer_map
    from tl_taskmap.neurons.masked_training import train_control_model
    from tl_taskmap.neurons.multitask import multitask_model
    from tl_taskmap.report_config import MapConfig, load_suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("paper-layer-map"))
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--task-names", nargs="+", default=[])
    parser.add_argument("--held-out", nargs="*", default=[])
    parser.add_argument("--multitask-steps", type=int, default=60)
    parser.add_argument("--multitask-lr", type=float, default=1e-4)
    parser.add_argument("--control-steps", type=int, default=20)
    parser.add_argument("--control-lr", type=float, default=1e-4)
    parser.add_argument("--boot", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = MapConfig(out=str(args.out), examples=args.examples, task_names=args.task_names)
    selection, evaluation = load_suite(cfg)
    model = load_default_model()
    print(f"tasks {selection.names}; {len(evaluation[0])} evaluation examples per task; loaded in {time.perf_counter() - start:.0f} s", flush=True)
    settings = dict(steps=args.control_steps, lr=args.control_lr, batch_size=8, seed=0, progress=False)
    mt = multitask_model(model, selection, cache_dir=args.out, held_out=args.held_out, steps=args.multitask_steps,
                         lr=args.multitask_lr, batch_size=8, seed=0, progress=False, log=print)
    print(f"{mt} ({time.perf_counter() - start:.0f} s)", flush=True)
    controls = {t.name: train_control_model(model, t, **settings) for t in selection}
    print(f"controls trained ({time.perf_counter() - start:.0f} s)", flush=True)
    build_layer_map(model, selection, evaluation, controls, folder=args.out / "layers", multitask=mt, control_settings=settings,
                    n_boot=args.boot, seed=0, log=print)
    lm = read_layer_map(args.out / "layers")
    pd.set_option("display.width", 200)
    print(f"\n== done in {time.perf_counter() - start:.0f} s (load average {open('/proc/loadavg').read().split()[:3]})")
    print("\n== multi-task model, held-out metric\n", lm["tables"]["multitask_scores"].round(3).to_string(index=False))
    for key in ("pair", "null_pair", "pair_unseen"):
        print(f"\n== sections, {key}:", json.dumps(lm["sections"].get(key), default=str))
    print("\n== rules:", json.dumps(lm["rules"], indent=1))
    print("\n== task-specific layers (task vs null, one model):", lm["task_specific_layers"])
    print("== layers fine-tuning leaves unchanged:", lm["unchanged_layers"])
    print("== gains surviving the null:", lm.get("survive_null_layers"))
    for name in ("pair", "null_pair", "pair_vs_null"):
        frame = lm["tables"][name]
        summary = frame.groupby("layer")[["diff", "low", "high"]].mean().round(3)
        print(f"\n== {name}: mean over tasks of diff and interval ends per layer\n", summary.T.to_string())


if __name__ == "__main__":
    main()
