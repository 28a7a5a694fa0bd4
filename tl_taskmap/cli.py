"""The ``tl-taskmap`` command (also ``python -m tl_taskmap``): a thin layer over :func:`tl_taskmap.report.map_model`.

Every option maps to a :class:`~tl_taskmap.report.config.MapConfig` field. Options are checked
(paths exist, ``k`` in (0, 1], seeds ≥ 1, dtype / device / site names) before anything heavy is
imported or any model is loaded; a bad option exits with status 2 and a message naming it.

Example:
    $ tl-taskmap map --out taskmap-report                       # the embedded model, built-in tasks
    $ tl-taskmap map --model ./my-hf-model --tasks reviews.jsonl topics.csv --template "Text: {text}\\nLabel:" \\
          --target-template "{label}" --options-field choices --k 0.05 --seeds 5 --out my-report
    $ tl-taskmap map --config taskmap-report/config.json         # repeat a run (finished stages are reused)

    >>> from tl_taskmap.cli import main
    >>> main(["map", "--k", "2", "--dry-run"])   # doctest: +SKIP
    2
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from typing import Any, Optional, Sequence

from tl_taskmap.report.config import ABLATION_MODES, CONTROL_NEURONS, DTYPES, REDUCTIONS, ConfigError, MapConfig
from tl_taskmap.report.config import SELECTION_METHODS

_DEFAULTS = MapConfig()
_RUN_OPTIONS = ("command", "config", "force", "dry_run", "quiet", "threads", "debug")  # how to run, not what: not in MapConfig


def _fraction(text: str) -> float:
    """``0.1`` or ``10%``."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or 10%, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _control(text: str) -> tuple[str, str]:
    task, sep, folder = text.partition("=")
    if not sep or not task or not folder:
        raise argparse.ArgumentTypeError(f"expected TASK=FOLDER, got {text!r}")
    return task, folder


def _template(text: str) -> str:
    """Shell-friendly templates: a typed ``\\n`` or ``\\t`` means a newline or tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _optional(text: str) -> Optional[str]:
    return None if text.lower() in ("", "none") else text


def _help(text: str, field: str) -> str:
    return f"{text} (default: {getattr(_DEFAULTS, field)!r})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``tl-taskmap --help``, ``tl-taskmap map --help``)."""
    parser = argparse.ArgumentParser(prog="tl-taskmap", description="Map where multi-task learning happens inside a language model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    m = sub.add_parser(
        "map", formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
        help="run the task map and write an HTML report",
        description="Evaluate the model on each task, find each task's neurons (grad x activation relevance, top-k%), "
                    "their overlap and parameter similarity, the layer map (CKA to per-task control models, sections, "
                    "dims for 99% variance, cross-task similarity) and the ablation matrix with random baselines; write "
                    "report.html, PNG figures, JSON/CSV/safetensors results and config.json to --out. Re-running with the "
                    "same configuration reuses finished stages.",
        epilog="Examples:\n  tl-taskmap map --out taskmap-report\n"
               "  tl-taskmap map --model ./hf-folder --tasks a.jsonl b.csv --template 'Q: {question}\\nA:' "
               "--target-template ' {answer}'\n"
               "  tl-taskmap map --tasks tasks.yaml            # a YAML/JSON spec mixing built-in and own tasks (see README)\n"
               "  tl-taskmap map --task-names word_sentiment --tasks mine.jsonl --template 'Text: {text}\\nLabel:'\n"
               "  tl-taskmap map --config taskmap-report/config.json --k 0.05   # re-run: only neuron and ablation stages recompute\n"
               "  tl-taskmap tasks                              # the built-in tasks: cluster, metric, size, chance, zero-shot score")
    g = m.add_argument_group("output")
    g.add_argument("-o", "--out", metavar="DIR", help=_help("output folder", "out"))
    g.add_argument("--config", metavar="FILE", help="start from a config.json of an earlier run; other options override it")
    g.add_argument("--force", action="store_true", help="recompute every stage, even those finished with this configuration")
    g.add_argument("--dry-run", action="store_true", help="check the options and load the tasks, print the configuration, load no model")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="on an error, print the full traceback as well")
    g = m.add_argument_group("models")
    g.add_argument("--model", type=_optional, metavar="NAME_OR_DIR",
                   help="local Hugging Face folder or hub name, booted as a TransformerBridge (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--second-model", type=_optional, metavar="NAME_OR_DIR",
                   help="a second model on the same inputs, e.g. the base model of --model: CKA between them and base-vs-tuned "
                        "layer sections (default: none)")
    g.add_argument("--control-model", dest="control_models", action="append", type=_control, metavar="TASK=DIR",
                   help="a per-task control model saved with save_control_model (repeatable)")
    g.add_argument("--train-controls", type=int, metavar="N", help=_help("train control models for the first N tasks without one", "train_controls"))
    g.add_argument("--control-steps", type=int, metavar="N", help=_help("fine-tuning steps per trained control model", "control_steps"))
    g.add_argument("--control-lr", type=float, metavar="LR", help="learning rate of trained control models (default: 2e-3 with --control-neurons lora, 1e-4 otherwise)")
    g.add_argument("--control-neurons", choices=CONTROL_NEURONS,
                   help=_help("train LoRA adapters on q and v (the paper's controls), all parameters, or only the task's top-k neurons",
                             "control_neurons"))
    g.add_argument("--save-controls", action="store_true", help="write trained control models to OUT/controls/ (safetensors)")
    g.add_argument("--device", metavar="DEVICE", help=_help("cpu, cuda, cuda:N or mps", "device"))
    g.add_argument("--dtype", choices=DTYPES, help=_help("model precision", "dtype"))
    g.add_argument("--batch-size", type=int, metavar="N", help=_help("rows per forward pass", "batch_size"))
    g.add_argument("--threads", type=_positive, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 can be much faster on a busy machine)")
    g = m.add_argument_group("tasks")
    g.add_argument("--tasks", action="extend", nargs="+", metavar="SPEC",
                   help="a YAML/JSON task spec (each task with its own source, template, options, cluster, metric), task files "
                        "(.json/.jsonl/.csv/.parquet, or a BIG-bench task.json / folder), built-in task names, bigbench:NAME, or "
                        "hf:NAME for a datasets hub name (needs internet); mixes with --task-names "
                        "(default: the built-in offline suite)")
    g.add_argument("--task-names", action="extend", nargs="+", metavar="NAME",
                   help="tasks of the built-in suite to map, added before --tasks (`tl-taskmap tasks` lists them)")
    g.add_argument("--template", type=_template, metavar="TEMPLATE",
                   help=_help("prompt template of task files, with {column} placeholders, e.g. 'Review: {text}\\nSentiment:'", "template"))
    g.add_argument("--target-template", type=_template, metavar="TEMPLATE",
                   help=_help("answer template, e.g. ' {label}'; with options an integer picks options[i]", "target_template"))
    g.add_argument("--options", action="extend", nargs="+", metavar="OPTION",
                   help="answer options shared by every row (multiple choice), e.g. ' negative' ' positive'")
    g.add_argument("--options-field", type=_optional, metavar="COLUMN", help="column holding each row's answer options")
    g.add_argument("--split", metavar="SPLIT", help=_help("split of hf: tasks", "split"))
    g.add_argument("--examples", type=int, metavar="N",
                   help=_help("examples per task (a seeded sample; the run says which tasks have more): half select neurons, "
                              "half measure", "examples"))
    g = m.add_argument_group("analysis")
    g.add_argument("--sites", action="extend", nargs="+", metavar="SITE",
                   help=_help("sites of the layer map (resid_post, resid_mid, mlp_out, attn_out, mlp_post, ...)", "sites"))
    g.add_argument("--reduce", choices=REDUCTIONS, help=_help("per-example representation: last prompt token or mean", "reduce"))
    g.add_argument("-k", "--k", type=_fraction, metavar="FRACTION", help=_help("top-k fraction of neurons per task, in (0, 1]: 0.1 or 10%%", "k"))
    g.add_argument("--global-top-k", dest="per_layer", action="store_false", help="select the top-k over the whole model, not per layer")
    g.add_argument("--seeds", type=int, metavar="N", help=_help("random neuron sets per ablation row", "seeds"))
    g.add_argument("--ablation-mode", choices=ABLATION_MODES, help=_help("how neurons are switched off", "ablation_mode"))
    g.add_argument("--no-heads", dest="heads", action="store_false", help="skip the attention-head stage (head relevance, sets, ablation)")
    g.add_argument("--seed", type=int, metavar="N", help=_help("seed of splits, sampling and training", "seed"))
    g.add_argument("--selection", nargs="*", choices=SELECTION_METHODS, metavar="METHOD",
                   help=_help(f"selection methods to compare side by side ({', '.join(SELECTION_METHODS)}); none: skip", "selection"))
    _add_layer_map_options(m)
    t = sub.add_parser("tasks", help="list the built-in tasks (cluster, metric, size, chance, zero-shot score)",
                       description="List the built-in tasks: cluster, metric, number of examples in the source, chance "
                                   "accuracy and the embedded SmolLM2-135M-Instruct's measured zero-shot score (64 examples, "
                                   "seed 0; python -m tl_taskmap.zero_shot re-measures it). Sizes need the cached assets.")
    t.add_argument("--no-sizes", dest="sizes", action="store_false", help="skip reading the task files for their sizes")
    t.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    return parser


def list_tasks(sizes: bool = True, as_json: bool = False) -> int:
    """``tl-taskmap tasks``: print the built-in tasks.

    Example:
        >>> list_tasks(sizes=False)   # doctest: +SKIP
        0
    """
    import pandas as pd

    from tl_taskmap.task_spec import builtin_table

    table = builtin_table(sizes=sizes)
    if as_json:
        print(table.to_json(orient="records", indent=1))
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, na_rep="–"))
    print("\nzero_shot: the embedded model's score (accuracy, or exact match for generation) on 64 examples; chance: "
          "guessing among the options. Map some with: tl-taskmap map --task-names NAME ... (and --tasks for your own).")
    return 0


def _add_layer_map_options(m: argparse.ArgumentParser) -> None:
    """Null controls and the multi-task base-vs-tuned pair of the layer map (:mod:`tl_taskmap.report.layer_map`)."""
    from tl_taskmap.report.config import MULTITASK_MODES

    g = m.add_argument_group("layer map: null controls and the multi-task pair")
    g.add_argument("--null-controls", action=argparse.BooleanOptionalAction,
                   help=_help("train a null control (shuffled answers) per control model", "null_controls"))
    g.add_argument("--layer-map-boot", type=int, metavar="N", help=_help("bootstrap resamples of the layer-map intervals", "layer_map_boot"))
    g.add_argument("--multitask", choices=MULTITASK_MODES,
                   help=_help("multi-task fine-tune of the model as the paper's tuned model: use a cached one (auto), "
                              "train it if needed (train), or not (off); --second-model takes precedence", "multitask"))
    g.add_argument("--multitask-steps", type=int, metavar="N", help=_help("fine-tuning steps of the multi-task model", "multitask_steps"))
    g.add_argument("--multitask-lr", type=float, metavar="LR", help=_help("learning rate of the multi-task model", "multitask_lr"))
    g.add_argument("--multitask-held-out", action="extend", nargs="+", metavar="TASK",
                   help="tasks kept out of multi-task training (the paper's unseen tasks)")
    g.add_argument("--multitask-cache", type=_optional, metavar="DIR",
                   help="folder of the multi-task model cache (default: the asset cache, $TL_TASKMAP_CACHE)")


def config_from_args(args: argparse.Namespace) -> MapConfig:
    """A validated MapConfig from parsed ``map`` options (``--config`` first, then the options given)."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in _RUN_OPTIONS}
    if "control_models" in given:
        given["control_models"] = dict(given["control_models"])
    base = MapConfig.load(args.config).to_dict() if getattr(args, "config", None) else {}
    return MapConfig.from_dict({**base, **given}).validate()


_USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG)


def user_error(err: BaseException, debug: bool = False, cause: Optional[BaseException] = None) -> int:
    """Print one ``tl-taskmap map: error: ...`` line (and the traceback with ``--debug``); return exit status 2."""
    if debug:
        traceback.print_exception(cause or err)
    print(f"tl-taskmap map: error: {err}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``tl-taskmap``; returns the exit status (0 ok, 1 failed run, 2 bad options).

    Example:
        >>> main(["map", "--out", "taskmap-report"])   # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tasks":
        return list_tasks(args.sizes, args.json)
    if args.command != "map":
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        config = config_from_args(args)
        if getattr(args, "dry_run", False):
            from tl_taskmap.report.config import load_suite

            selection, evaluation = load_suite(config)
            print(json.dumps(config.to_dict(), indent=1))
            for sel, ev in zip(selection, evaluation):
                print(f"task {sel.name!r} ({sel.cluster}, {sel.metric}): {len(sel)} selection + {len(ev)} evaluation examples")
            from tl_taskmap.task_spec import row_notes

            for note in row_notes(selection, evaluation, config.examples):
                print(f"note: {note}")
            return 0
    except ConfigError as err:
        return user_error(err, debug)
    from tl_taskmap.report import map_model

    if argv is None:  # run as the command (this process is the map's own); a caller passing argv keeps its collector as is
        _import_model_classes_and_freeze()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = map_model(config, force=getattr(args, "force", False), progress=not getattr(args, "quiet", False))
    except ConfigError as err:  # e.g. an unknown task name, found when the tasks load (before any model); --out in use
        return user_error(err, debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("tl-taskmap map: interrupted; finished stages are kept (each is verified on reuse): run the same command again "
              "to resume", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno in _USER_OS_ERRORS:  # read-only or full disk, a path too long: the user can fix it
            return user_error(ConfigError(f"cannot write {err.filename or config.out}: {err.strerror}; free space or choose a writable --out"),
                              debug, cause=err)
        if not isinstance(err, FileNotFoundError):
            raise
        print(f"tl-taskmap map: error: {err}", file=sys.stderr)  # e.g. the model package or the task archive is missing
        if debug:
            traceback.print_exc()
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 wrote the report
        print(result.html)
    return 0


def _import_model_classes_and_freeze() -> None:
    """Import the model libraries now and freeze what they made (:func:`tl_taskmap.memory.freeze_long_lived_objects`).

    This process exists for one map, so the imports live as long as it does; frozen, they no longer
    slow down the garbage collections between stages.
    """
    import importlib

    for name in ("transformers", "transformer_lens", "transformer_lens.model_bridge"):
        try:
            importlib.import_module(name)
        except ImportError:  # a TransformerLens without the bridge: the model load says what is missing
            pass
    from tl_taskmap.memory import freeze_long_lived_objects

    freeze_long_lived_objects()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
