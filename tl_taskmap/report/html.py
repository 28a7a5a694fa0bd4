"""The report writer: figures from a run's saved results, and one self-contained ``report.html``.

Everything is read back from the output folder (so the report can be rebuilt without a model):
figures are drawn with :mod:`tl_taskmap.plots`, saved as ``figures/<name>.png`` and embedded in the
HTML as base64 ``data:`` URIs; the style sheet is inline; there are no scripts and no external
links, so the file renders the same offline, attached to an e-mail or in a headless browser.

The writer takes results, not the configuration: the saved files in the output folder and a
:class:`ReportContent` the pipeline builds (what the run was, its stage records, its notes).

Example:
    >>> from tl_taskmap.report.html import ReportContent, write_report
    >>> html, figures = write_report(out, content)   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from tl_taskmap.report.layout import ReportLayout

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa;line-height:1.45}
main{max-width:1100px;margin:auto;padding:1.5em 2em;background:#fff}
h1{margin-top:0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}figure{margin:1.2em 0;text-align:center}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555;text-align:left;max-width:900px;margin:.4em auto}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:.5em 1em;margin:1em 0}
.error{background:#ffebee;border-left:4px solid #e53935;padding:.5em 1em}
.wide{overflow-x:auto}pre{background:#f5f5f5;padding:1em;overflow-x:auto;font-size:.85em}ul.findings li{margin:.3em 0}
"""


@dataclass(frozen=True)
class ReportContent:
    """What the page shows besides the saved results; the pipeline builds it, the writer only reads it.

    Attributes:
        model_name: The model's name in the title. selection, evaluation: The task suites (the two halves).
        stages: Stage name → its record (``cached``, ``seconds``, ``files``, stage extras).
        notes: The "left out, and why" notes. k, per_layer, seeds, examples: What the neuron and ablation
        stages were run with. has_second: A second (base) model was compared. device, dtype: Where it ran.
        configuration: The configuration as shown (and repeated with ``--config``). seconds, model_seconds:
        Wall time before drawing the page, and of it loading models.

    Example:
        >>> content = ReportContent("m", sel, ev, stages={}, notes=[], k=0.1, per_layer=False, seeds=1, examples=16)  # doctest: +SKIP
    """

    model_name: str
    selection: Any
    evaluation: Any
    stages: Mapping[str, Mapping[str, Any]]
    notes: Sequence[str]
    k: float
    per_layer: bool
    seeds: int
    examples: int
    has_second: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    configuration: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model_seconds: float = 0.0


class _Figures:
    """Draws, saves and embeds figures; a figure that fails is reported in the page, not hidden."""

    def __init__(self, layout: ReportLayout):
        self.layout, self.paths, self.errors = layout, {}, {}
        layout.figures.mkdir(parents=True, exist_ok=True)

    def html(self, name: str, caption: str, draw: Callable[[], Any]) -> str:
        try:
            fig = draw()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            _close(fig)
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the whole report
            self.errors[name] = f"{type(err).__name__}: {err}"
            return f'<p class="error">Figure <b>{name}</b> could not be drawn: {_esc(self.errors[name])}</p>'
        data = buffer.getvalue()
        self.paths[name] = self.layout.figure(name)
        self.paths[name].write_bytes(data)
        encoded = base64.b64encode(data).decode("ascii")
        return (f'<figure id="fig-{name}"><img alt="{_esc(name)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{caption}</figcaption></figure>")


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for figures pyplot does not manage


def _esc(text: Any) -> str:
    return html_lib.escape(str(text))


def _table(frame: pd.DataFrame, index: bool = False, digits: int = 3) -> str:
    table = frame.to_html(index=index, float_format=lambda v: f"{v:.{digits}f}", border=0, na_rep="–", escape=True)
    return f"<div class='wide'>{table}</div>"


def _read(path: Path) -> Optional[pd.DataFrame]:
    return pd.read_csv(path) if path.is_file() else None


def _new_axes(n: int, size: tuple[float, float]) -> tuple[Any, list]:
    from tl_taskmap.plots import _new_axes as new_axes

    return new_axes(None, size, n)


# ---------------------------------------------------------------------------------------- sections
def _tasks_section(fig: _Figures, baseline: pd.DataFrame, selection: Any, evaluation: Any) -> str:
    from tl_taskmap import plots

    baseline = _with_chance_tests(baseline)
    flags = {r.task: _flag(r.above_chance) for r in baseline[baseline["model"] == "model"].itertuples()}
    rows = [{"task": s.name, "cluster": s.cluster, "metric": s.metric, "selection examples": len(s), "evaluation examples": len(e),
             "above chance": flags.get(s.name, "–"),
             "example prompt": (s.examples[0].prompt[:90] + "…") if len(s.examples[0].prompt) > 90 else s.examples[0].prompt}
            for s, e in zip(selection, evaluation)]
    shown = baseline[["model", "task", "cluster", "metric", "metric_value", "chance", "loss", "n", "n_correct", "p_above_chance",
                      "p_above_chance_holm"]].assign(**{"above chance": [_flag(a) for a in baseline["above_chance"]]})
    return ("<h2 id='tasks'>Tasks and baseline</h2><p>Each task is split in half with a fixed seed: the <i>selection</i> half "
            "finds neurons and trains control models, the <i>evaluation</i> half measures everything below. Accuracy compares "
            "the answer options' mean token log-likelihood; exact match / ROUGE-L score greedy generations. <b>Above chance</b>: "
            "exact one-sided binomial test of the number of correct answers against chance accuracy "
            "(<code>p_above_chance</code>), Holm-adjusted over the model's tasks (<code>p_above_chance_holm</code>), at "
            "family-wise α = 0.05. A task that is not above chance is flagged in every table and left out of averages and of "
            "the ablation tests' Holm families: with nothing learned there is nothing for an ablation to remove.</p>"
            + _table(pd.DataFrame(rows))
            + fig.html("baseline", "Metric of each task on the evaluation half; dashed: chance. Tasks near chance carry little "
                                   "signal for ablation (there is nothing to lose).", lambda: plots.plot_baseline(baseline))
            + _table(shown, digits=4))


def _layers_section(fig: _Figures, stats: Any, has_second: bool, controls: list[dict], layer_map: Optional[dict] = None) -> tuple[str, Any]:
    from tl_taskmap import plots
    from tl_taskmap.report.labels import CONTROL_LABEL, MODEL_LABEL, SECOND_LABEL
    from tl_taskmap.stats.similarity import centred_cosine_omitted, embedding_omitted

    parts = ["<h2 id='layers'>Layer map</h2><p>Representations are the residual stream at the last prompt token "
             f"({', '.join(stats.sites)}), one vector per example and layer (layer <i>l</i> = output of block <i>l</i>, "
             "0-based; Hugging Face <code>hidden_states[l+1]</code>). Linear CKA compares two models' representations of the "
             "same examples; the <b>debiased</b> estimator corrects the upward bias of plain (biased) CKA when there are few "
             "examples per dimension, as here.</p>"]
    sections = None
    pair = (layer_map or {}).get("pair") or ("second" if has_second else None)
    control_pairs = [p for p in stats.pairs if CONTROL_LABEL in p]
    if control_pairs:
        if has_second:  # the names shared / transition / refinement need a base + tuned pair
            sections = stats.sections(tuned=MODEL_LABEL, base=SECOND_LABEL, estimator="debiased")
        trained = ", ".join(f"{c['task']} ({c.get('source')})" for c in controls)
        parts.append(fig.html(
            "cka_curves", f"CKA per layer between each model and the per-task control models C<sub>t</sub> (mean over the tasks "
            f"that have one: {_esc(trained)}; band: min–max), biased (left) and debiased (right)"
            + ("; shading: layer sections found on the debiased curves." if sections is not None else "."),
            lambda: _cka_panels(stats, control_pairs, sections)))
        if sections is not None:
            spans = {n: getattr(sections, n) for n in ("shared", "transition", "refinement")}
            described = ", ".join(f"{n} {s[0]}–{s[1]}" if s else f"no {n} section" for n, s in spans.items())
            parts.append(f"<p><b>Sections (model vs second model):</b> {_esc(described)}."
                         + (f" {_esc(sections.reason)}" if sections.reason else "")
                         + f"</p><p class='note'>Rule: {_esc(sections.rule)}</p>")
    if layer_map:
        html_map, pair_sections = _layer_map_html(fig, layer_map)
        parts.append(html_map)
        if sections is None and pair_sections is not None:
            sections = pair_sections
    if (MODEL_LABEL, SECOND_LABEL) in stats.pairs or (SECOND_LABEL, MODEL_LABEL) in stats.pairs:
        parts.append(fig.html("cka_model_vs_second", "CKA between the model and the second model per layer, across tasks.",
                              lambda: plots.plot_cka_boxes(stats, (MODEL_LABEL, SECOND_LABEL), estimator="debiased")))
    parts.append(_dims_html(fig, stats))
    layers = list(stats.meta.get("embedding_layers", []))
    if layers:
        if centred_cosine_omitted(len(stats.tasks)) is None:
            parts.append(fig.html("task_similarity", "Task × task cosine similarity of mean task representations (centred on the "
                                                     f"mean over tasks) at layers {layers}: which tasks the model represents alike.",
                                  lambda: _similarity_panels(stats, layers)))
        if embedding_omitted(_sampled_per_task(stats)) is None:
            parts.append(fig.html("tsne", f"t-SNE of per-example representations at layers {layers}, coloured by task.",
                                  lambda: plots.plot_task_embedding(stats, layers, model=MODEL_LABEL)))
    return "".join(parts), (sections if pair else None)


def _sampled_per_task(stats: Any) -> dict[str, int]:
    return {t: len(info.get("sample_index", [])) or int(info.get("n_examples", 0)) for t, info in stats.tasks.items()}


def _dims_html(fig: _Figures, stats: Any) -> str:
    """Dims-for-99% per layer; counts at the cap min(n − 1, d) are marked as capped, not drawn as a trend."""
    from tl_taskmap import plots
    from tl_taskmap.stats.spectral import capped_dims

    try:
        table = stats.spectrum_by_task(stats.models[0], "dims_99")
    except KeyError:
        return ""
    n = np.array([stats.tasks[t]["n_examples"] for t in table.index])[:, None]
    d = max(len(v) for v in stats.eigenvalues.values()) if stats.eigenvalues else int(table.to_numpy().max()) + 1
    capped = capped_dims(table.to_numpy(np.float64), n, d)
    caption = ("Number of principal dimensions explaining 99% of the variance of each task's representations, per layer "
               f"(mean over tasks; band: min–max). Crosses: counts at the cap min(n − 1, d) = {int(min(n.min() - 1, d))}, "
               "which n examples cannot exceed; those layers are limited by the sample size, not measured.")
    note = ""
    if capped.all():
        return (f"<p class='note'>Dims for 99% variance: every task and layer sits at the cap min(n − 1, d) = "
                f"{int(min(n.min() - 1, d))} (n = {int(n.min())} evaluation examples): the count measures the sample size "
                "here, not the layers, so it is not plotted (raise --examples above d to read it).</p>")
    if capped.any():
        note = (f"<p class='note'>{int(capped.sum())} of {capped.size} task × layer counts are at the cap min(n − 1, d); "
                "they are marked, not drawn as a trend.</p>")
    return fig.html("dims_99", caption, lambda: plots.plot_dims_for_99(stats, cap=(n.ravel(), d))) + note


def _layer_map_html(fig: _Figures, layer_map: dict) -> tuple[str, Any]:
    """Task vs null control (one model) and the base-vs-tuned pair with its null (the paper's comparison)."""
    from tl_taskmap import plots
    from tl_taskmap.stats.sections import LayerSections

    tables, rules, parts = layer_map.get("tables", {}), layer_map.get("rules", {}), []
    if "task_vs_null" in tables:
        specific = layer_map.get("task_specific_layers", {})
        unchanged = layer_map.get("unchanged_layers") or []
        parts.append("<h3>Task control vs null control</h3><p>A <b>null control</b> is the task control's fine-tuning on the "
                     "same prompts with shuffled answers: it changes what any fine-tune of this length changes. The curve is "
                     "CKA(model, null) − CKA(model, task control): above zero, the task control departs from the model "
                     "<i>more</i> than the null does. Task-specific layers: "
                     + _esc("; ".join(f"{t}: {_spans(v) or 'none'}" for t, v in specific.items())) + ". "
                     + "Layers fine-tuning leaves unchanged: " + _esc(_spans(unchanged) or "none") + ".</p>"
                     + f"<p class='note'>Rules: {_esc(rules.get('task_vs_null', ''))} {_esc(rules.get('unchanged', ''))}</p>")
        parts.append(fig.html("task_vs_null", "CKA(model, null control) − CKA(model, task control) per layer and task, with "
                              "simultaneous bootstrap intervals over examples; filled markers: task-specific layers.",
                              lambda: plots.plot_layer_difference(tables["task_vs_null"], ylabel="extra departure of the task control")))
    pair_sections = None
    if layer_map.get("pair") and "pair" in tables:
        who = "the multi-task fine-tune (tuned) vs the model (base)" if layer_map["pair"] == "multitask" else "the model (tuned) vs the second model (base)"
        parts.append(f"<h3>Base vs tuned: {_esc(who)}</h3>")
        found = layer_map.get("sections", {})
        for key, label in (("pair", "task controls"), ("null_pair", "null controls"), ("pair_unseen", "unseen tasks (task controls)")):
            if found.get(key):
                sec = found[key]
                described = ", ".join(f"{n} {sec[n][0]}–{sec[n][1]}" if sec[n] else f"no {n} section" for n in ("shared", "transition", "refinement"))
                parts.append(f"<p><b>Sections with {label}:</b> {_esc(described)}." + (f" {_esc(sec['reason'])}" if sec.get("reason") else "") + "</p>")
        if found.get("pair"):
            sec = found["pair"]
            pair_sections = LayerSections(*(tuple(sec[n]) if sec[n] else None for n in ("shared", "transition", "refinement")),
                                          sec["rule"], sec.get("reason"), tuple(sec.get("layers", ())))
            parts.append(f"<p class='note'>Section rule: {_esc(sec['rule'])} Intervals: {_esc(rules.get('pair', ''))}</p>")
        survive = layer_map.get("survive_null_layers")
        if survive is not None:
            parts.append("<p><b>Gains that survive the null</b> (tuned − base CKA with the task control, minus the same with the "
                         "null control; interval above 0): " + _esc("; ".join(f"{t}: {_spans(v) or 'none'}" for t, v in survive.items()))
                         + f".</p><p class='note'>{_esc(rules.get('pair_vs_null', ''))}</p>")
        frames = {k: tables[k] for k in ("pair", "null_pair") if k in tables}
        parts.append(fig.html("pair_gain", "CKA(tuned, control) − CKA(base, control) per layer, with task controls (left) and null "
                              "controls (right); dashed lines: unseen tasks (held out of multi-task training).",
                              lambda: plots.plot_pair_gain(frames)))
        if "multitask_scores" in tables:
            scores = tables["multitask_scores"]
            improved = int((scores.loc[~scores["unseen"], "gain"] > 0).sum())
            parts.append(f"<p>Held-out metric of the multi-task model beside the base ({improved} of {int((~scores['unseen']).sum())} "
                         "training tasks improved" + ("" if improved else " — it did not improve on the tasks, so the pair is weak")
                         + "):</p>" + _table(scores))
        parts.append(_paper_box(layer_map))
    return "".join(parts), pair_sections


def _spans(layers: Sequence[int]) -> str:
    out, run = [], []
    for layer in sorted(layers):
        if run and layer != run[-1] + 1:
            out.append(run)
            run = []
        run.append(layer)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


def _paper_box(layer_map: dict) -> str:
    mt = layer_map.get("multitask") or {}
    settings = mt.get("settings", {})
    tuned = (f"a multi-task full fine-tune made here ({settings.get('steps')} steps, lr {settings.get('lr')}, on "
             f"{len(mt.get('trained_on', []))} tasks' selection halves)" if layer_map.get("pair") == "multitask"
             else "the user's second model")
    return ("<div class='note'><b>How this differs from the paper</b> (Zhao et al. 2024): Llama-2-7B (32 layers) with "
            "instruction tuning on ~60 FLAN tasks (LoRA, 3 epochs) and converged single-task LoRA controls on up to 10,000 test "
            f"examples per task; here: a small model, {_esc(tuned)} instead of instruction tuning, short full fine-tunes as "
            "controls, tens of evaluation examples per task, and intervals from a bootstrap over examples (the paper reports "
            "point estimates). Null controls (shuffled answers) are an addition of this tool.</div>")


def _cka_panels(stats: Any, pairs: Sequence[tuple[str, str]], sections: Any) -> Any:
    from tl_taskmap import plots

    fig, axes = _new_axes(2, (6.0, 3.6))
    for ax, estimator in zip(axes, ("biased", "debiased")):
        plots.plot_cka_curves(stats, pairs, estimator=estimator, sections=sections, ax=ax)
        ax.set_title(f"{estimator} CKA")
    return fig


def _similarity_panels(stats: Any, layers: Sequence[int]) -> Any:
    from tl_taskmap import plots

    n = len(stats.tasks)
    fig, axes = _new_axes(len(layers), (max(3.5, 0.4 * n + 2), max(3.0, 0.4 * n + 1.5)))
    for ax, layer in zip(axes, layers):
        plots.plot_task_similarity(stats, layer, centre=True, ax=ax)
        ax.set_title(f"layer {layer}")
    fig.suptitle("cosine of centred task means")
    return fig


def _neurons_section(fig: _Figures, out: ReportLayout, k: float, per_layer: bool) -> str:
    from tl_taskmap import plots

    rel = _read(out.relevance_by_layer)
    jaccard = pd.read_csv(out.neuron_table("jaccard.csv"), index_col=0)
    layer_overlap, sweep = _read(out.neuron_table("jaccard_per_layer.csv")), _read(out.neuron_table("overlap_sweep.csv"))
    params = _read(out.neuron_table("parameter_similarity.csv"))
    pairs_html = (
        fig.html("jaccard", f"Jaccard overlap |A∩B|/|A∪B| of the tasks' top-{k:.0%} sets. Two random sets of this size "
                            f"overlap by {plots.random_jaccard(k):.3f} on average.", lambda: plots.plot_jaccard_matrix(jaccard))
        + fig.html("overlap_by_layer", "Overlap per layer, mean over task pairs, against random sets.",
                 lambda: plots.plot_overlap_by_layer(layer_overlap, k))
        + fig.html("overlap_sweep", "Overlap as the selected fraction grows (the paper's Table 8 sweep); at 100% every set is "
                                    "the whole model.", lambda: plots.plot_overlap_sweep(sweep))
        + fig.html("parameter_similarity", "Cosine similarity of the task sets' neuron parameters within the model, per layer "
                                           "(masked reading: weight-norm-weighted overlap).",
                   lambda: plots.plot_parameter_similarity(params))
    ) if len(jaccard) > 1 else ("<p class='note'>One task: overlap between task neuron sets and their parameter similarity "
                                "compare pairs of tasks, so they are absent; add a task to see them.</p>")
    return ("<h2 id='neurons'>Task neurons</h2><p>Relevance of MLP neuron <i>j</i> in layer <i>l</i> for a task is "
            "Σ|∂L/∂a·a| over the selection examples' answer tokens (a first-order estimate of the loss change from zeroing it, "
            f"Leng &amp; Xiong 2024); each task's set is its top {k:.0%} neurons"
            f"{' in every layer' if per_layer else ' over the whole model'}.</p>"
            + fig.html("relevance_by_layer", "Share of each task's total relevance per layer.", lambda: plots.plot_relevance_by_layer(rel))
            + pairs_html)


def _ablation_section(fig: _Figures, matrix: Any, spec: pd.DataFrame, per_layer: bool) -> str:
    from tl_taskmap import plots
    from tl_taskmap.neurons.ablation_effects import plot_ablation_matrix

    def heatmap() -> Any:
        table = matrix.delta_table()
        fig_, (ax,) = _new_axes(1, (3.0 + 1.1 * table.shape[1], 2.0 + 0.5 * table.shape[0]))
        plot_ablation_matrix(matrix, ax=ax)
        return fig_

    excluded = [t for t, a in zip(spec["task"], spec["above_chance"]) if _is_false(a)]
    return (f"<h2 id='ablation'>Ablation</h2><p>Each row switches a neuron set off (mode <code>{_esc(matrix.mode)}</code>) and "
            "scores every task on its evaluation half; <code>random(t)</code> rows average "
            f"{len(matrix.seeds)} random sets with exactly the per-layer counts of task <i>t</i>'s set. Cells: metric change "
            "(ablated − baseline)."
            + (" With per-layer top-k every task's set has the same count in every layer, so the random rows are the same "
               "sets (evaluated once) and read alike." if per_layer else "")
            + "</p>"
            + fig.html("ablation_matrix", "Task × task ablation matrix with random baselines (below the line)."
                       + (f" Not above chance (flagged; read these columns with care): {_esc(', '.join(excluded))}." if excluded else ""),
                       heatmap)
            + fig.html("specificity", "Extra drop of each task's metric from its own neurons compared with random neurons and with "
                                      "the other tasks' neurons; bars: 95% intervals over examples and random seeds (no bar: no "
                                      "example differs).", lambda: plots.plot_specificity(spec))
            + "<p><b>Tests.</b> <i>Own − random</i>: per example, the score after ablating each random set minus the score "
              "after ablating the task's own set; examples and random seeds are crossed random factors, and the 95% interval is "
              "the two-way random-effects t-interval (variance components from the examples × seeds mean squares, Satterthwaite "
              "degrees of freedom), calibrated by simulation at 80 examples × 5 seeds (coverage 93–97%). <i>Own − other</i>: the "
              "other tasks' sets are fixed rows, averaged per example; paired t-interval over examples. Answer-loss effects "
              "(nats per token, positive: the own set raises the loss more) use the same intervals on the per-example losses. "
              "p (Holm): two-sided p-value of no difference, Holm-adjusted over the tasks above chance. Where no example's score "
              "differs the table says so instead of giving a zero-width interval. <i>Detectable drop</i>: the smallest "
              "own-vs-random accuracy drop this run detects with 80% power at its n, seeds, baseline accuracy and random-set "
              "flip rate; smaller effects can go unseen.</p>"
            + _table(_specificity_display(spec)))


def _is_false(value: Any) -> bool:
    return value is not pd.NA and value is not None and not (isinstance(value, float) and np.isnan(value)) and not bool(value)


def _flag(value: Any) -> str:
    """The above-chance flag shown in every table."""
    if _is_false(value):
        return "NO (left out)"
    return "–" if value is pd.NA or value is None or (isinstance(value, float) and np.isnan(value)) else "yes"


def _with_chance_tests(baseline: pd.DataFrame) -> pd.DataFrame:
    """``baseline.csv`` with the above-chance test (computed here when an older run's file lacks it)."""
    from tl_taskmap.stats.inference import above_chance_table

    if "p_above_chance_holm" in baseline and "above_chance" in baseline:
        return baseline.assign(above_chance=pd.array([pd.NA if pd.isna(a) else bool(a) for a in baseline["above_chance"]], dtype="boolean"))
    return above_chance_table(baseline, by="model" if "model" in baseline else None)


def _effect_text(row: Any, name: str, digits: int = 3) -> str:
    """``+0.125 [+0.050, +0.200]``, ``no example differs (0 of 80)`` or ``–`` for one comparison of a specificity row."""
    value, low, high = row[name], row.get(f"{name}_low", np.nan), row.get(f"{name}_high", np.nan)
    changed = row.get(f"{name}_changed", pd.NA)
    if not pd.isna(changed) and int(changed) == 0:
        return f"no example differs (0 of {int(row['n'])})"
    if pd.isna(value):
        return "–"
    if pd.isna(low):
        return f"{value:+.{digits}f} (no interval)"
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _p_text(row: Any, name: str) -> str:
    if _is_false(row.get("above_chance", pd.NA)):
        return "left out"
    p = row.get(f"{name}_p_holm", np.nan)
    return "–" if pd.isna(p) else f"{p:.3g}"


def _mde_text(row: Any) -> str:
    mde = row.get("mde_80", np.nan)
    if not pd.isna(mde):
        return f"{mde:.3f}"
    return "none at this n" if row.get("metric") in ("accuracy", "exact_match") and row.get("baseline", 0) > 0 else "–"


def _specificity_display(spec: pd.DataFrame) -> pd.DataFrame:
    """The specificity table as shown: effects with intervals, Holm p-values, power, the above-chance flag."""
    rows = []
    for _, r in spec.iterrows():
        rows.append({
            "task": r["task"], "above chance": _flag(r.get("above_chance", pd.NA)), "n": r.get("n", np.nan),
            "seeds": r.get("n_seeds", np.nan), "baseline": r["baseline"], "own drop": r["own_drop"],
            "own − random [95% CI]": _effect_text(r, "vs_random"), "p (Holm)": _p_text(r, "vs_random"),
            "own − other [95% CI]": _effect_text(r, "vs_other"), "p (Holm) ": _p_text(r, "vs_other"),
            "loss: own − random [95% CI]": _effect_text(r, "loss_vs_random"), "p (Holm)  ": _p_text(r, "loss_vs_random"),
            "loss: own − other [95% CI]": _effect_text(r, "loss_vs_other"), "p (Holm)   ": _p_text(r, "loss_vs_other"),
            "detectable drop (80% power)": _mde_text(r),
        })
    return pd.DataFrame(rows)


def _heads_section(fig: _Figures, out: ReportLayout, k: float, record: Optional[dict]) -> str:
    """The attention-head section (stage ``heads``); empty when the stage did not run."""
    from tl_taskmap import plots
    from tl_taskmap.neurons.ablation_effects import AblationMatrix, plot_ablation_matrix

    if record is None:
        return ""
    if record.get("skipped"):
        return f"<h2 id='heads'>Attention heads</h2><p class='note'>Skipped: {_esc(record['skipped'])}</p>"
    heads = out.heads
    by_head, by_layer = pd.read_csv(heads.table("relevance_by_head.csv")), pd.read_csv(heads.table("relevance_by_layer.csv"))
    neuron_layers, overlap = _read(out.relevance_by_layer), _read(heads.table("overlap_vs_random.csv"))
    matrix, spec = AblationMatrix.load(heads.ablation.matrix), pd.read_csv(heads.ablation.specificity)
    layout = record.get("layout", {})
    gqa = (f" The model uses grouped-query attention ({layout.get('n_heads')} query heads share {layout.get('n_key_value_heads')} "
           "key/value heads per layer): the units are query heads, each with its own output; ablating one leaves the shared "
           "key/value head untouched." if layout.get("n_key_value_heads") and layout.get("n_key_value_heads") != layout.get("n_heads") else "")

    def heatmap() -> Any:
        table = matrix.delta_table()
        fig_, (ax,) = _new_axes(1, (3.0 + 1.1 * table.shape[1], 2.0 + 0.5 * table.shape[0]))
        plot_ablation_matrix(matrix, ax=ax)
        return fig_

    cols = ["task", "metric", "baseline", "own_drop", "random_drop", "other_drop", "vs_random", "vs_random_low", "vs_random_high",
            "vs_other", "vs_other_low", "vs_other_high"]
    return ("<h2 id='heads'>Attention heads</h2><p>The same questions for attention heads. Relevance of head <i>h</i> in layer "
            "<i>l</i> is Σ|Σ<sub>d</sub> ∂L/∂z·z| over the selection examples' answer tokens, where <i>z</i> is the head's output "
            "before W<sub>O</sub> (<code>attn.hook_z</code>): the first-order loss change from zeroing the whole head. Each task's "
            f"head set is its top {k:.0%} heads (at least one per layer); ablation zeroes the heads' outputs (mode "
            f"<code>{_esc(matrix.mode)}</code>).{_esc(gqa)}</p>"
            + fig.html("head_relevance", "Share of each task's head relevance per (layer, head), mean over tasks.",
                       lambda: plots.plot_head_relevance(by_head))
            + (fig.html("relevance_neurons_vs_heads", "Where in depth relevance lies: MLP neurons (left) and attention heads "
                        "(right), share of each task's total per layer.",
                        lambda: plots.plot_relevance_neurons_vs_heads(neuron_layers, by_layer)) if neuron_layers is not None else "")
            + ((fig.html("head_overlap", "Jaccard overlap of the tasks' head sets (red) against random head sets with the same "
                                         f"per-layer counts ({int(overlap['n_draws'].iloc[0]) if len(overlap) else 0} draws; grey: "
                                         "mean and 95% range). With few heads per layer chance overlap is high.",
                         lambda: plots.plot_head_overlap(overlap))
                + _table(overlap.drop(columns=["n_draws"]))) if overlap is not None else
               "<p class='note'>Head-set overlap compares tasks: a one-task map has none.</p>")
            + fig.html("head_ablation_matrix", f"Task × task ablation matrix of head sets, with {len(matrix.seeds)} random head "
                                               "sets of matched per-layer counts per row (below the line).", heatmap)
            + fig.html("head_specificity", "Extra drop of each task's metric from ablating its own heads compared with random "
                                           "heads and with other tasks' heads; bars: 95% intervals over examples and random seeds.",
                       lambda: plots.plot_specificity(spec))
            + _table(spec[cols]))


def _selection_section(fig: _Figures, out: ReportLayout, record: dict) -> str:
    """The selection-method comparison (stage ``selection``); empty when the stage wrote nothing."""
    if not record.get("files"):
        return ""
    from tl_taskmap.neurons.selection_compare import SelectionComparison, plot_selection_comparison

    cmp = SelectionComparison.load(out.selection)
    meta = cmp.meta
    n_eval = sorted(set(meta.get("n_evaluation_examples", {}).values()))

    def bars(value: str) -> Any:
        fig_, (ax,) = _new_axes(1, (max(5.0, 0.6 * cmp.table["task"].nunique() * max(1, len(cmp.matrices)) + 2), 3.4))
        plot_selection_comparison(cmp.table, value, ax=ax)
        return fig_

    cols = ["method", "task", "baseline", "n_neurons", "own_drop", "vs_random", "vs_random_low", "vs_random_high", "vs_other",
            "vs_other_low", "vs_other_high", "loss_vs_random", "loss_vs_other", "jaccard_other", "jaccard_random"]
    return ("<h2 id='selection'>Selection methods compared</h2><p>Each method picks every task's neurons on the selection half; "
            "the sets are ablated on the evaluation half "
            f"({', '.join(map(str, n_eval))} examples per task, {len(meta.get('seeds', []))} random seeds, mode "
            f"<code>{_esc(meta.get('mode'))}</code>). <b>gradxact</b>: Σ|∂L/∂a·a| on the answer loss (the paper's); "
            "<b>contrastive</b>: the same attribution of the margin between the correct option and the mean of the others "
            "(generation tasks: against another example's target), |·| per example; <b>specific</b>: r̂<sub>t</sub>² / Σ<sub>u</sub> "
            "r̂<sub>u</sub> with each task's relevance normalised to total 1; <b>exclusive</b>: gradxact's set minus neurons in the "
            "sets of at least max(2, ⌈T/2⌉) tasks. own − random / own − other: extra drop of the task's metric (intervals: "
            "bootstrap over examples and random seeds); loss columns: extra answer-loss increase in nats (no interval); "
            "Jaccard: mean overlap with the other tasks' sets of the same method, and of matched random sets.</p>"
            f"<p><b>Verdict:</b> {_esc(cmp.verdict)}</p>"
            + fig.html("selection_vs_other", "Own − other tasks' sets, per method and task (95% intervals).", lambda: bars("vs_other"))
            + fig.html("selection_vs_random", "Own − matched random sets, per method and task (95% intervals).", lambda: bars("vs_random"))
            + _table(cmp.summary) + _table(cmp.table[cols]))


def _findings(baseline: pd.DataFrame, spec: Optional[pd.DataFrame], jaccard: pd.DataFrame, k: float, sections: Any,
              rel: Optional[pd.DataFrame], has_base: bool, effects: Optional[dict] = None, alpha: float = 0.05) -> str:
    """Findings from the tests (each with its test, effect and interval, n, and the Holm-corrected count), then
    descriptive summaries that rest on no test."""
    from tl_taskmap.plots import random_jaccard

    items = _tested_findings(_with_chance_tests(baseline), spec, effects or {}, alpha)
    described = []
    off = jaccard.to_numpy(float)[~np.eye(len(jaccard), dtype=bool)]
    if off.size:
        described.append(f"Task neuron sets (top {k:.0%}) overlap by Jaccard {off.mean():.3f} on average (range {off.min():.3f}–"
                         f"{off.max():.3f}); random sets of the same size would overlap by {random_jaccard(k):.3f}.")
    if rel is not None and len(rel):
        peak = rel.groupby("layer")["relevance_share"].mean()
        top = ", ".join(str(int(x)) for x in peak.sort_values(ascending=False).index[:3])
        described.append(f"Relevance is highest (mean over tasks) in layers {top}.")
    if sections is not None:
        described.append("Layer sections: " + (", ".join(f"{n} {s[0]}–{s[1]}" for n in ("shared", "transition", "refinement")
                                                         if (s := getattr(sections, n)) is not None) or "none identified")
                         + (f" ({sections.reason})" if sections.reason else "")
                         + ("" if has_base else " — from CKA to the control models alone, without a base model: descriptive only") + ".")
    return ("<ul class='findings'>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"
            + ("<p>Descriptive summaries (point estimates, no test behind them):</p><ul>"
               + "".join(f"<li>{_esc(i)}</li>" for i in described) + "</ul>" if described else ""))


def _n_text(values: Any) -> str:
    values = sorted({int(v) for v in values if not pd.isna(v)})
    if not values:
        return "?"
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _tested_findings(baseline: pd.DataFrame, spec: Optional[pd.DataFrame], effects: dict, alpha: float) -> list[str]:
    """One sentence per claim: the test, the count after Holm, the effect with its interval, n."""
    from tl_taskmap.stats.inference import combine_effects

    items = []
    for model, own in baseline.groupby("model", sort=False):
        tested = own[own["p_above_chance"].notna()]
        if not len(tested):
            continue
        below = tested[tested["above_chance"].eq(False).fillna(False)]
        text = (f"Above chance ({model}): {int(tested['above_chance'].sum())} of {len(tested)} multiple-choice tasks, by an exact "
                f"one-sided binomial test per task, Holm-corrected over the {len(tested)} tasks (family-wise α = {alpha:g}; "
                f"n = {_n_text(tested['n'])} evaluation examples per task).")
        if len(below):
            text += (" Not above chance — flagged in every table, left out of averages and of the ablation tests: "
                     + "; ".join(f"{r.task} ({r.metric_value:.3f} vs chance {r.chance:.3f}, adjusted p = {r.p_above_chance_holm:.3g})"
                                 for r in below.itertuples()) + ".")
        items.append(text)
    if spec is None or not len(spec):
        return items
    included = spec[~spec["above_chance"].eq(False).fillna(False)] if "above_chance" in spec else spec
    if not len(included):
        items.append("No task is above chance, so no ablation effect is claimed: with nothing learned there is nothing for "
                     "an ablation to remove (the per-task effects are still in the ablation table).")
    seeds = _n_text(spec["n_seeds"]) if "n_seeds" in spec else "?"
    claims = [
        ("vs_random", "metric", f"own vs matched random neurons, crossed examples × {seeds} random seeds t-interval",
         "own neurons lower the task's metric more than random ones", "extra drop"),
        ("vs_other", "metric", "own vs the other tasks' neurons, paired t-interval over examples",
         "own neurons lower the task's metric more than the other tasks' neurons", "extra drop"),
        ("loss_vs_random", "loss", f"answer loss, own vs matched random neurons, crossed examples × {seeds} seeds t-interval",
         "own neurons raise the answer loss more than random ones", "extra loss (nats/token)"),
        ("loss_vs_other", "loss", "answer loss, own vs the other tasks' neurons, paired t-interval over examples",
         "own neurons raise the answer loss more than the other tasks' neurons", "extra loss (nats/token)"),
    ]
    for name, _, test, claim, effect_name in claims:
        if f"{name}_p_holm" not in included:
            continue
        rows = included[included[f"{name}_p"].notna()]
        if not len(rows):
            continue
        positive = rows[(rows[f"{name}_p_holm"] < alpha) & (rows[name] > 0)]
        negative = rows[(rows[f"{name}_p_holm"] < alpha) & (rows[name] < 0)]
        text = (f"{test[0].upper() + test[1:]}, Holm over {len(rows)} tasks above chance: {claim} for {len(positive)} of "
                f"{len(rows)} tasks (adjusted p < {alpha:g})" + (f", less for {len(negative)}" if len(negative) else "") + ".")
        pooled = combine_effects([e for t in rows["task"] if (e := effects.get(t, {}).get(name)) is not None], alpha=alpha)
        if pooled is not None and len(rows) > 1:
            text += (f" Mean {effect_name} over these {len(rows)} tasks: {pooled.describe()} (95% Welch–Satterthwaite interval, "
                     "tasks treated as independent).")
        per_task = [f"{r['task']} {_effect_text(r, name)}" + ("" if pd.isna(r[f'{name}_p_holm']) else f" (adjusted p = {r[f'{name}_p_holm']:.3g})")
                    for _, r in rows.iterrows()]
        shown = per_task[:8] + ([f"… {len(per_task) - 8} more in the ablation table"] if len(per_task) > 8 else [])
        text += f" Per task (95% CI; n = {_n_text(rows['n'])} examples): " + "; ".join(shown) + "."
        items.append(text)
    if "mde_80" in spec and spec["mde_80"].notna().any():
        mde = spec["mde_80"].dropna()
        items.append(f"Power: with n = {_n_text(spec['n'])} evaluation examples and {seeds} random seeds, the smallest own-vs-random "
                     f"accuracy drop this run detects with 80% power (two-sided α = {alpha:g}) is {mde.min():.3f}"
                     + (f"–{mde.max():.3f}, depending on the task" if mde.max() > mde.min() + 5e-4 else "")
                     + "; a task without a significant effect may still have one below that size."
                     + (f" For {', '.join(spec.loc[spec['mde_80'].isna() & (spec['baseline'] > 0), 'task'])} no drop is detectable "
                        "at this n." if (spec["mde_80"].isna() & (spec["baseline"] > 0)).any() else ""))
    return items


def write_report(out: Path, content: ReportContent) -> tuple[Path, dict[str, Path]]:
    """Draw every figure from the results in ``out`` and write ``out/report.html``; returns ``(html, figures)``.

    Example:
        >>> html, figures = write_report(Path("report"), content)   # doctest: +SKIP
    """
    from tl_taskmap.neurons.ablation_effects import AblationMatrix, specificity, specificity_effects
    from tl_taskmap.stats.results import LayerStats

    layout = ReportLayout(out)
    fig = _Figures(layout)
    baseline = pd.read_csv(layout.baseline)
    stats = LayerStats.load(layout.layers.stats)
    controls = json.loads(layout.layers.controls.read_text())
    matrix = AblationMatrix.load(layout.ablation.matrix)
    spec = pd.read_csv(layout.ablation.specificity)
    if "vs_random_p_holm" not in spec:  # written before the tests existed: recompute from the saved matrix
        spec = specificity(matrix)
    c, stages, selection = content, content.stages, content.selection
    spec["above_chance"] = pd.array([pd.NA if pd.isna(a) else bool(a) for a in spec["above_chance"]], dtype="boolean")
    tasks_html = _tasks_section(fig, baseline, selection, c.evaluation)
    from tl_taskmap.report.layer_map import read_layer_map

    layers_html, sections = _layers_section(fig, stats, c.has_second, controls, read_layer_map(layout.layers.folder))
    neurons_html = _neurons_section(fig, layout, c.k, c.per_layer)
    ablation_html = _ablation_section(fig, matrix, spec, c.per_layer)
    heads_html = _heads_section(fig, layout, c.k, stages.get("heads"))
    findings = _findings(baseline, spec, pd.read_csv(layout.neuron_table("jaccard.csv"), index_col=0), c.k, sections,
                         _read(layout.relevance_by_layer), c.has_second or sections is not None,
                         effects=specificity_effects(matrix))
    model_name = c.model_name
    timing = pd.DataFrame([{"stage": n, "reused": bool(r.get("cached")), "seconds (when computed)": r["seconds"]} for n, r in stages.items()])
    files = sorted(layout.rel(p) for p in layout.out.rglob("*") if p.is_file() and p.name != layout.html.name and not p.name.startswith("."))
    body = (
        f"<h1>Task map of {_esc(model_name)}</h1>"
        f"<p>{len(selection)} tasks ({_esc(', '.join(selection.names))}), {c.examples} examples each, top-k = {c.k:g}, "
        f"{c.seeds} random seeds, {_esc(c.device)}/{_esc(c.dtype)}. Computing the stages took "
        f"{sum(r['seconds'] for r in stages.values()):.0f} s; this run took {c.seconds:.0f} s before drawing this page"
        + (f" (model loading {c.model_seconds:.0f} s)" if c.model_seconds else "")
        + (f", reusing {sum(bool(r.get('cached')) for r in stages.values())} finished stages" if any(r.get("cached") for r in stages.values()) else "")
        + ".</p>"
        "<nav><a href='#findings'>Findings</a><a href='#tasks'>Tasks</a><a href='#layers'>Layer map</a><a href='#neurons'>Neurons</a>"
        "<a href='#ablation'>Ablation</a>" + ("<a href='#heads'>Heads</a>" if heads_html else "")
        + ("<a href='#selection'>Selection methods</a>" if stages.get("selection", {}).get("files") else "")
        + "<a href='#left-out'>Left out</a><a href='#files'>Files</a><a href='#config'>Configuration</a></nav>"
        f"<h2 id='findings'>Findings</h2>{findings}"
        + tasks_html + layers_html + neurons_html + ablation_html + heads_html + _selection_section(fig, layout, stages.get("selection", {}))
        + "<h2 id='left-out'>Left out, and why</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in c.notes) + "</ul>"
        + (f"<p class='error'>Figures that failed: {_esc(fig.errors)}</p>" if fig.errors else "")
        + "<h2 id='files'>Files and timings</h2>" + _table(timing, digits=1)
        + "<p>Results as data, next to this file:</p><pre>" + _esc("\n".join(files)) + "</pre>"
        + f"<h2 id='config'>Configuration</h2><p>Repeat this run with <code>tl-taskmap map --config {layout.config.name}</code>.</p><pre>"
        + _esc(json.dumps(dict(c.configuration), indent=1)) + "</pre>"
    )
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tl_taskmap: {_esc(model_name)}</title>"
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")
    html_path = layout.html
    html_path.write_text(page, encoding="utf-8")
    return html_path, dict(fig.paths)
