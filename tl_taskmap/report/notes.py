"""What a run's report leaves out, and why: plain-language notes from its configuration and tasks.

The pipeline writes these into the page's "Left out" section (the HTML writer never reads the configuration).

Example:
    >>> from tl_taskmap.report.config import MapConfig
    >>> from tl_taskmap.tasks import Example, Task, as_suite
    >>> suite = as_suite([Task("sum", [Example("1 + 1 =", " 2", (" 2", " 3"))] * 4)])
    >>> notes = left_out(MapConfig(), suite, control_tasks=[])
    >>> notes[0][:40]
    'No base (pre-trained) model was compared'
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["left_out"]


def left_out(config: Any, selection: Any, control_tasks: Sequence[str]) -> list[str]:
    """Plain-language list of the comparisons a run could not make, and why."""
    notes = []
    if not config.second_model:
        notes.append("No base (pre-trained) model was compared (the embedded SmolLM2-135M is instruction-tuned and no same-family "
                     "base loads offline). The names shared / transition / refinement need a base + tuned pair (--second-model, or "
                     "the multi-task fine-tune); without one the page shows the layers fine-tuning leaves unchanged and where task "
                     "controls depart from the model more than null controls do.")
    if len(selection) == 1:
        notes.append(f"This map has one task ({selection.names[0]}): the comparisons between tasks — neuron-set overlap, parameter "
                     "similarity, cross-task similarity of representations and the ablation matrix's other-task rows and columns "
                     "(and so the 'own vs other tasks' neurons' specificity) — need at least two tasks and are absent. Relevance, "
                     "the task's neurons against random sets, ablation against random sets and the layer map against "
                     "control models are complete.")
    missing = [t for t in selection.names if t not in control_tasks]
    if missing:
        notes.append(f"Control models (one fine-tuned copy per task, the paper's C_t) exist for {len(control_tasks)} of "
                     f"{len(selection)} tasks ({', '.join(control_tasks) or 'none'}); to stay within a CPU budget none was "
                     f"trained for {', '.join(missing)}, so those tasks have no CKA-to-control curve (raise --train-controls).")
    if control_tasks and any(t not in config.control_models for t in control_tasks):
        trained = {"full": "all parameters", "task": "only the task's top-k neurons",
                   "lora": "rank-8 LoRA on the query and value projections, as the paper's"}[config.control_neurons]
        notes.append(f"Trained control models are short fine-tunes ({config.control_steps} steps, lr {config.control_learning_rate:g}, "
                     f"{trained}) on {config.examples // 2} examples, far from the paper's 3-epoch LoRA controls: their CKA "
                     "curves show where a few steps of training on one task move the representations, not what a converged "
                     "single-task model looks like.")
    if not config.second_model and getattr(config, "multitask", "off") != "train":
        notes.append("The paper's experimental model E (fine-tuned on all tasks together) is trained only with multitask='train' "
                     "(or when a cached one is found, see the layer map); otherwise the given model stands in for E "
                     "(python -m tl_taskmap.setup_assets --multitask builds it ahead of time).")
    from tl_taskmap.stats.similarity import centred_cosine_omitted, embedding_omitted

    for reason in (centred_cosine_omitted(len(selection)), embedding_omitted({t.name: len(t) for t in selection})):
        if reason:
            notes.append(reason)
    notes.append("Neuron-restricted fine-tuning and NCFT continual learning are not part of the report (they train several "
                 "models); tutorial 04 runs them.")
    return notes
