"""The built-in offline task suite, chat-template wrapping, and loaders for 🤗 datasets, files and lists.

:func:`default_suite` builds real tasks from the cached BIG-bench archive and the VADER sentiment
lexicon (both fetched once by ``python -m tl_taskmap.setup_assets``). The tasks were chosen by
measuring SmolLM2-135M-Instruct's zero-shot accuracy on BIG-bench candidates; the measurements
are kept in :data:`DEFAULT_TASKS` (a few at-chance tasks are kept on purpose as controls).

Example:
    >>> from tl_taskmap.suite import default_suite
    >>> suite = default_suite()              # doctest: +SKIP
    >>> train, evaluation = default_suite(split="train"), default_suite(split="eval")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import random
import string
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tl_taskmap.bigbench import QA_TEMPLATE, extract_bigbench_tasks, default_archive, extracted_dir, load_bigbench_task
from tl_taskmap.embedded import cache_root
from tl_taskmap.tasks import Example, Metric, Task, TaskSuite, validate_row

VADER_VERSION = "3.3.2"
VADER_DOWNLOAD_COMMAND = f"pip download --no-deps vaderSentiment=={VADER_VERSION}"
# "Word: …\nSentiment:" scored 0.97 on a 30-word probe; 'Is the word "…" positive or negative?\nAnswer:' only 0.53.
VADER_TEMPLATE = "Word: {word}\nSentiment:"

# Short-answer generation needs the answer format shown: with the plain Q/A prompt the model
# restates the question ("5 + 3") and scores 0. These templates carry two worked examples.
ADD_2SHOT = "Q: What is 2 plus 2?\nA: 4\n\nQ: What is 3 plus 5?\nA: 8\n\nQ: {input}\nA:"
SUB_2SHOT = "Q: What is 7 minus 2?\nA: 5\n\nQ: What is 9 minus 6?\nA: 3\n\nQ: {input}\nA:"
MUL_2SHOT = "Q: What is 2 times 3?\nA: 6\n\nQ: What is 4 times 2?\nA: 8\n\nQ: {input}\nA:"
PLURAL_2SHOT = "Singular: cat\nPlural: cats\n\nSingular: box\nPlural: boxes\n\nSingular: {input}\nPlural:"
PAST_2SHOT = "Present: walk\nPast: walked\n\nPresent: go\nPast: went\n\nPresent: {input}\nPast:"


@dataclass(frozen=True)
class TaskSpec:
    """How to build one default task, and what the default model scored on it when it was chosen.

    Attributes:
        name: Task name in the suite. cluster: task family.
        source: ``"bigbench"`` (``ref`` is the BIG-bench task name) or ``"vader"`` (the lexicon).
        template: Prompt template (default: ``QA_TEMPLATE`` for BIG-bench, ``VADER_TEMPLATE`` for VADER).
        mode: ``"choice"`` or ``"generation"`` (None: the task file decides).
        zero_shot: Score of SmolLM2-135M-Instruct (raw prompts, mean option log-likelihood,
            greedy exact match for generation) on the task's :data:`PROBE_N` default examples.
        chance: Chance accuracy (None for generation).
        control: Kept on purpose although at chance, as a control task.
        shots: Worked examples inside the template (0: zero-shot).
    """

    name: str
    cluster: str
    source: str
    ref: str
    template: Optional[str] = None
    mode: Optional[str] = None
    zero_shot: Optional[float] = None
    chance: Optional[float] = None
    control: bool = False
    shots: int = 0


#: Examples per task behind ``TaskSpec.zero_shot`` (the default ``max_examples``, seed 0).
PROBE_N = 64
#: The default suite. Chosen from ~45 BIG-bench candidates (English, >= 100 examples, <= 10
#: options, short inputs) probed on 20-30 examples each: raw Q/A prompts beat the chat template
#: (e.g. 1-digit addition 0.63 vs 0.60, movie recommendation 0.70 vs 0.63, at 3x the tokens) and
#: mean option log-likelihood beat the sum on most tasks (addition 0.63 vs 0.37, phrase relatedness
#: 0.75 vs 0.45). Left out at chance or below: strategyqa, entailed_polarity, misconceptions,
#: implicatures, navigate, winowhy, snarks, hyperbaton, metaphor_boolean, logical_fallacy_detection,
#: hindu_knowledge, simple_ethical_questions, emojis_emotion_prediction, bbq_lite_json/age_ambig.
#: ``zero_shot`` below is `python -m tl_taskmap.zero_shot` on the 64 default examples (seed 0):
#: 11 of the 13 non-control tasks beat chance (one-sided binomial test, 5%); generation tasks
#: show two worked examples in their template (``shots=2``).
DEFAULT_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("addition_1digit", "arithmetic", "bigbench", "arithmetic/1_digit_addition", ADD_2SHOT, "generation", 0.484, shots=2),
    TaskSpec("subtraction_1digit", "arithmetic", "bigbench", "arithmetic/1_digit_subtraction", SUB_2SHOT, "generation", 0.109, shots=2),
    TaskSpec("multiplication_1digit", "arithmetic", "bigbench", "arithmetic/1_digit_multiplication", MUL_2SHOT, "generation", 0.5, shots=2),
    TaskSpec("plural", "morphology", "bigbench", "linguistic_mappings/plural_json", PLURAL_2SHOT, "generation", 0.859, shots=2),
    TaskSpec("past_tense", "morphology", "bigbench", "linguistic_mappings/past_tense_json", PAST_2SHOT, "generation", 0.594, shots=2),
    TaskSpec("phrase_relatedness", "semantics", "bigbench", "phrase_relatedness", zero_shot=0.703, chance=0.25),
    TaskSpec("metaphor_to_literal", "semantics", "bigbench", "metaphor_understanding/met2lit", zero_shot=0.5, chance=0.25),
    TaskSpec("unit_identification", "semantics", "bigbench", "unit_conversion/unit_identification", zero_shot=0.984, chance=0.333),
    TaskSpec("movie_recommendation", "commonsense", "bigbench", "movie_recommendation", zero_shot=0.672, chance=0.25),
    TaskSpec("pronoun_disambiguation", "commonsense", "bigbench", "disambiguation_qa", zero_shot=0.406, chance=0.333),
    TaskSpec("social_iqa", "commonsense", "bigbench", "social_iqa", zero_shot=0.391, chance=0.336),
    TaskSpec("date_understanding", "commonsense", "bigbench", "date_understanding", zero_shot=0.297, chance=0.171),
    TaskSpec("word_sentiment", "sentiment", "vader", "vader_lexicon", zero_shot=0.953, chance=0.5),
    TaskSpec("sports_understanding", "control", "bigbench", "sports_understanding", zero_shot=0.562, chance=0.5, control=True),
    TaskSpec("anachronisms", "control", "bigbench", "anachronisms", zero_shot=0.438, chance=0.5, control=True),
)


# ---------------------------------------------------------------------------- chat templates
def apply_chat_template(task: Task, model_or_tokenizer: Any, *, system: Optional[str] = None) -> Task:
    """Wrap every prompt in the model's chat template as one user turn, answered by the assistant.

    The assistant turn starts on a fresh line, so leading spaces are stripped from targets and
    options. ``task.meta["chat_template"]`` records that this was done (and the system prompt).

    Example:
        >>> chat_task = apply_chat_template(task, model.tokenizer)   # doctest: +SKIP
        >>> chat_task.examples[0].prompt[-22:]                        # doctest: +SKIP
        '<|im_start|>assistant\\n'
    """
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no chat template; use the raw prompts (chat_template=False)")
    if task.meta.get("chat_template"):
        raise ValueError(f"task {task.name!r} is already wrapped in a chat template")
    examples = []
    for e in task.examples:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": e.prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        options = tuple(o.lstrip() for o in e.options) if e.options else None
        examples.append(Example(prompt, e.target.lstrip(), options))
    return replace(task, examples=examples, meta={**task.meta, "chat_template": True, "chat_system": system})


# ---------------------------------------------------------------------------- datasets, files, lists
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _template_fields(template: str, what: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"{what} template {template!r} is not a valid format string: {err}") from None


def _load_records(source: Any, split: str, load_kwargs: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], str]:
    if isinstance(source, (list, tuple)) and (not source or isinstance(source[0], Mapping)):
        return list(source), "records"
    import datasets

    path = Path(str(source)).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"cannot read {path.name}: supported files are {sorted(_FILE_BUILDERS)}")
        data = datasets.load_dataset(builder, data_files=str(path), split="train", **load_kwargs)
        return list(data), str(path)
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no data file at {path}")
    data = datasets.load_dataset(str(source), split=split, **load_kwargs)  # a hub name: needs internet
    return list(data), f"{source}[{split}]"


def load_dataset_task(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    prompt: str,
    target: str,
    options: Optional[Sequence[str] | str] = None,
    name: Optional[str] = None,
    cluster: str = "misc",
    metric: Optional[Metric] = None,
    split: str = "train",
    max_examples: Optional[int] = None,
    seed: int = 0,
    **load_kwargs: Any,
) -> Task:
    """A task from a 🤗 dataset (hub name), a local json/jsonl/csv/parquet file, or a list of dicts.

    Args:
        source: Hub name (needs internet), file path, or records (dicts).
        prompt: Instruction template with ``{column}`` placeholders, e.g. ``"Review: {text}\\nSentiment:"``.
        target: Template of the answer, e.g. ``" {label}"``. With ``options``, an integer result
            picks ``options[i]`` (so a 0/1 ``label`` column works).
        options: Answer options shared by all rows, or the name of a column holding each row's list.
        name, cluster, metric: As in :class:`Task` (name defaults to the source's name).
        split: Dataset split (hub datasets only). max_examples: keep this many (seeded shuffle).
        load_kwargs: Passed to ``datasets.load_dataset``.

    Raises:
        ValueError: a template without placeholders or naming a column that does not exist.

    Example:
        >>> rows = [{"text": "great film", "label": 1}, {"text": "dull", "label": 0}]
        >>> task = load_dataset_task(rows, prompt="Review: {text}\\nSentiment:", target="{label}",
        ...                          options=[" negative", " positive"], name="toy")
        >>> task.examples[0].target
        ' positive'
    """
    prompt_fields, target_fields = _template_fields(prompt, "prompt"), _template_fields(target, "target")
    if not prompt_fields:
        raise ValueError(f"prompt template {prompt!r} has no {{column}} placeholder: it would give every example the same prompt")
    if not target_fields:
        raise ValueError(f"target template {target!r} has no {{column}} placeholder")
    records, where = _load_records(source, split, load_kwargs)
    if not records:
        raise ValueError(f"{where} has no rows")
    columns = set(records[0])
    needed = set(prompt_fields) | set(target_fields) | ({options} if isinstance(options, str) else set())
    missing = sorted(needed - columns)
    if missing:
        raise ValueError(f"templates use columns {missing} that {where} does not have; its columns: {sorted(columns)}")
    examples = []
    for i, row in enumerate(records):
        validate_row(row, i, where, prompt_fields + target_fields, options if isinstance(options, str) else None)
        answer = target.format(**row)
        row_options = tuple(str(o) for o in row[options]) if isinstance(options, str) else tuple(options) if options else None
        if row_options is not None and answer not in row_options:
            if answer.strip().lstrip("-").isdigit() and 0 <= int(answer) < len(row_options):
                answer = row_options[int(answer)]
            else:
                raise ValueError(f"row {i}: target {answer!r} is neither one of the options {row_options} nor an index into them")
        examples.append(Example(prompt.format(**row), answer, row_options))
    default_name = Path(where).stem if where != "records" else "records"
    task = Task(name or default_name, examples, cluster=cluster, metric=metric,
                meta={"source": where, "template": prompt, "target_template": target, "chat_template": False})
    return task.subset(max_examples, seed=seed) if max_examples is not None and max_examples < len(task) else task


# ---------------------------------------------------------------------------- VADER lexicon
def vader_lexicon(cache_dir: Optional[str | os.PathLike[str]] = None) -> dict[str, float]:
    """VADER's word → mean valence (−4..4) from the cached ``vaderSentiment`` wheel or an installed copy.

    Example:
        >>> vader_lexicon()["wonderful"]   # doctest: +SKIP
        2.7
    """
    text: Optional[str] = None
    wheels = sorted((cache_root(cache_dir) / "lexicons").glob("vaderSentiment-*.whl"))
    if wheels:
        with zipfile.ZipFile(wheels[-1]) as zf:
            text = zf.read("vaderSentiment/vader_lexicon.txt").decode("utf-8")
    else:
        spec = importlib.util.find_spec("vaderSentiment")
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (Path(location) / "vader_lexicon.txt").is_file():
                text = (Path(location) / "vader_lexicon.txt").read_text(encoding="utf-8")
    if text is None:
        raise FileNotFoundError(
            f"the VADER lexicon is not in {cache_root(cache_dir) / 'lexicons'}; run `python -m tl_taskmap.setup_assets` "
            f"(it runs `{VADER_DOWNLOAD_COMMAND}` into the cache)"
        )
    lexicon = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            lexicon[parts[0]] = float(parts[1])
    return lexicon


def vader_sentiment_task(
    *, name: str = "word_sentiment", cluster: str = "sentiment", min_abs_valence: float = 2.0,
    max_examples: Optional[int] = 64, template: str = VADER_TEMPLATE, seed: int = 0, cache_dir: Optional[str | os.PathLike[str]] = None,
) -> Task:
    """Word-level sentiment from the VADER lexicon (MIT): strongly positive vs strongly negative words, balanced.

    Example:
        >>> task = vader_sentiment_task(max_examples=8)   # doctest: +SKIP
        >>> task.examples[0]                              # doctest: +SKIP
        Example(prompt='Word: cheerful\\nSentiment:', target=' positive', options=(' positive', ' negative'))
    """
    if "{word}" not in template:
        raise ValueError(f"template {template!r} has no {{word}} placeholder")
    words = {w: v for w, v in vader_lexicon(cache_dir).items() if w.isalpha() and w.islower() and abs(v) >= min_abs_valence}
    rng = random.Random(seed)
    positive = sorted(w for w, v in words.items() if v > 0)
    negative = sorted(w for w, v in words.items() if v < 0)
    rng.shuffle(positive), rng.shuffle(negative)
    k = min(len(positive), len(negative)) if max_examples is None else min(len(positive), len(negative), (max_examples + 1) // 2)
    chosen = [(w, " positive") for w in positive[:k]] + [(w, " negative") for w in negative[:k]]
    rng.shuffle(chosen)
    if max_examples is not None:
        chosen = chosen[:max_examples]
    options = (" positive", " negative")
    examples = [Example(template.format(word=w), label, options) for w, label in chosen]
    return Task(name, examples, cluster=cluster, metric="accuracy",
                meta={"source": f"vaderSentiment=={VADER_VERSION} vader_lexicon.txt", "template": template,
                      "min_abs_valence": min_abs_valence, "seed": seed, "chat_template": False})


# ---------------------------------------------------------------------------- the default suite
def default_task_names() -> list[str]:
    """Names of the default tasks (controls included)."""
    return [s.name for s in DEFAULT_TASKS]


def bigbench_refs(specs: Optional[Sequence[TaskSpec]] = None) -> list[str]:
    """BIG-bench task names the default suite reads (what setup extracts from the archive)."""
    return sorted({s.ref for s in (DEFAULT_TASKS if specs is None else specs) if s.source == "bigbench"})


def build_task(spec: TaskSpec, *, max_examples: Optional[int] = 64, seed: int = 0, cache_dir: Optional[str | os.PathLike[str]] = None) -> Task:
    """One default task from its spec (raw prompts), with the spec recorded in ``task.meta``."""
    if spec.source == "bigbench":
        path = extracted_dir(cache_dir) / spec.ref / "task.json"
        if not path.is_file():
            extract_bigbench_tasks([spec.ref], default_archive(cache_dir), extracted_dir(cache_dir))
        task = load_bigbench_task(path, name=spec.name, cluster=spec.cluster, template=spec.template or QA_TEMPLATE, mode=spec.mode,
                                  max_examples=max_examples, seed=seed)
    elif spec.source == "vader":
        task = vader_sentiment_task(name=spec.name, cluster=spec.cluster, max_examples=max_examples, template=spec.template or VADER_TEMPLATE,
                                    seed=seed, cache_dir=cache_dir)
    else:
        raise ValueError(f"unknown task source {spec.source!r} for {spec.name!r}")
    task.meta.update({"bigbench_task" if spec.source == "bigbench" else "lexicon": spec.ref, "control": spec.control, "shots": spec.shots, "probe_zero_shot": spec.zero_shot, "probe_n": PROBE_N})
    return task


def default_suite(
    *,
    max_examples: Optional[int] = 64,
    split: Optional[str] = None,
    train_fraction: float = 0.5,
    seed: int = 0,
    chat_template: bool = False,
    model_or_tokenizer: Any = None,
    names: Optional[Sequence[str]] = None,
    include_controls: bool = True,
    cache_dir: Optional[str | os.PathLike[str]] = None,
) -> TaskSuite:
    """The built-in offline suite (after ``python -m tl_taskmap.setup_assets``).

    Args:
        max_examples: Examples per task (a seeded sample), small enough for CPU.
        split: ``None`` (all examples), ``"train"`` or ``"eval"``: a fixed split by ``seed``.
        train_fraction: Share of each task's examples in the train split.
        seed: Seeds the sampling and the split.
        chat_template: Wrap prompts in the model's chat template (needs ``model_or_tokenizer``);
            recorded in each ``task.meta["chat_template"]``.
        names: Only these tasks. include_controls: keep the at-chance control tasks.

    Example:
        >>> suite = default_suite(split="eval")   # doctest: +SKIP
        >>> suite.clusters                         # doctest: +SKIP
    """
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    if chat_template and model_or_tokenizer is None:
        raise ValueError("chat_template=True needs the model (or its tokenizer): default_suite(chat_template=True, model_or_tokenizer=model)")
    specs = list(DEFAULT_TASKS)
    if names is not None:
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            raise KeyError(f"no default tasks {unknown}; available: {default_task_names()}")
        specs = [s for s in specs if s.name in set(names)]
    if not include_controls:
        specs = [s for s in specs if not s.control]
    missing = [s.ref for s in specs if s.source == "bigbench" and not (extracted_dir(cache_dir) / s.ref / "task.json").is_file()]
    if missing:
        extract_bigbench_tasks(missing, default_archive(cache_dir), extracted_dir(cache_dir))
    tasks = []
    for spec in specs:
        task = build_task(spec, max_examples=max_examples, seed=seed, cache_dir=cache_dir)
        if split is not None:
            task = task.split(train_fraction, seed=seed)[0 if split == "train" else 1]
        if chat_template:
            task = apply_chat_template(task, model_or_tokenizer)
        tasks.append(task)
    return TaskSuite(tasks)
