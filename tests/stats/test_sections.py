import json

import numpy as np
import pytest

from tl_taskmap.stats import LayerSections, detect_sections

LAYERS = range(1, 33)


def paper_curves():
    """Per-layer CKA shaped like Zhao et al.'s Llama-2-7B description (layers 1-32)."""
    base = np.linspace(0.9, 0.5, 32)
    tuned = base.copy()
    tuned[:9] -= 0.03  # shared 1-9: below the pre-trained model
    tuned[9:15] = [0.80, 0.87, 0.92, 0.95, 0.95, 0.94]  # transition 10-15: sharp rise, high
    tuned[15:] = np.linspace(0.85, 0.75, 17)  # refinement 16-32: high, to a lesser extent
    return tuned, base


def unseen_curves():
    """Unseen tasks: base slightly higher up to layer 12, tuned then overtakes gradually."""
    base = np.linspace(0.9, 0.5, 32)
    tuned = base - 0.01
    tuned[12:] = base[12:] + np.linspace(0.01, 0.3, 20)
    return tuned, base


def test_paper_shape_gives_paper_sections():
    tuned, base = paper_curves()
    sections = detect_sections(tuned, base, layers=LAYERS)
    assert (sections.shared, sections.transition, sections.refinement) == ((1, 9), (10, 15), (16, 32))
    assert sections.reason is None
    assert "tuned - base <= 0.0" in sections.rule and "0.25" in sections.rule
    assert [sections.section_of(layer) for layer in (1, 9, 10, 15, 16, 32, 33)] == [
        "shared", "shared", "transition", "transition", "refinement", "refinement", None]


def test_task_by_layer_input_is_averaged():
    tuned, base = paper_curves()
    rng = np.random.default_rng(0)
    wiggle = rng.normal(scale=0.02, size=(6, 32))
    wiggle -= wiggle.mean(0)  # the task mean is exactly the paper shape
    sections = detect_sections(tuned + wiggle, base + wiggle[::-1], layers=LAYERS)
    assert (sections.shared, sections.transition, sections.refinement) == ((1, 9), (10, 15), (16, 32))


def test_default_layer_labels_are_positions():
    tuned, base = paper_curves()
    sections = detect_sections(tuned, base)
    assert (sections.shared, sections.transition, sections.refinement) == ((0, 8), (9, 14), (15, 31))


def test_unseen_tasks_have_no_transition():
    tuned, base = unseen_curves()
    sections = detect_sections(tuned, base, layers=LAYERS)
    assert sections.transition is None
    assert "last layer" in sections.reason
    assert sections.shared == (1, 12) and sections.refinement == (13, 32)
    assert "transition=None" in repr(sections) and "reason=" in repr(sections)


def test_tuned_never_above_base():
    _, base = paper_curves()
    sections = detect_sections(base - 0.05, base, layers=LAYERS)
    assert sections.shared == (1, 32) and sections.transition is None and sections.refinement is None
    assert "never above base" in sections.reason


def test_peak_not_above_base_enough():
    tuned, base = paper_curves()
    base = np.maximum(base, tuned - 0.01)  # tuned exceeds base by at most 0.01 < min_gain
    sections = detect_sections(tuned, base, layers=LAYERS)
    assert sections.transition is None and "above base" in sections.reason
    assert detect_sections(tuned, base, layers=LAYERS, min_gain=0.005).transition is not None


def test_flat_curve_has_no_transition():
    base = np.full(12, 0.5)
    sections = detect_sections(np.full(12, 0.9), base)
    assert sections.transition is None and "min_gain" in sections.reason
    assert sections.shared is None and sections.refinement == (0, 11)


def test_without_base_curve():
    tuned, _ = paper_curves()
    sections = detect_sections(tuned, layers=LAYERS)
    # Band: t >= 0.95 - 0.25 * (0.95 - 0.75) = 0.90 around layer 13, i.e. layers 12-15; before it
    # the curve starts at 0.87 at layer 1, so the leading layers 1-11 are "before the transition".
    assert (sections.shared, sections.transition, sections.refinement) == ((1, 11), (12, 15), (16, 32))
    assert "no base curve" in sections.rule
    rising = np.linspace(0.3, 0.9, 32)
    nothing = detect_sections(rising, layers=LAYERS)
    assert (nothing.shared, nothing.transition, nothing.refinement) == (None, None, None)
    assert nothing.reason


def test_thresholds_change_the_result():
    tuned, base = paper_curves()
    wider = detect_sections(tuned, base, layers=LAYERS, band=0.9)  # band takes in most refinement layers
    assert wider.transition == (10, 28)
    widest = detect_sections(tuned, base, layers=LAYERS, band=1.0)  # band reaches the last layer
    assert widest.transition is None and widest.shared == (1, 9) and widest.refinement == (10, 32)
    tolerant = detect_sections(tuned, base, layers=LAYERS, shared_tol=0.2)
    assert tolerant.shared[1] > 9


def test_deterministic_and_serialisable():
    tuned, base = paper_curves()
    first = detect_sections(tuned, base, layers=LAYERS)
    assert all(detect_sections(tuned.copy(), base.copy(), layers=list(LAYERS)) == first for _ in range(3))
    as_dict = first.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["transition"] == [10, 15] and as_dict["layers"] == list(LAYERS)
    assert repr(first) == "LayerSections(shared=1-9, transition=10-15, refinement=16-32)"
    assert isinstance(first, LayerSections)


def test_ties_go_to_earliest_peak():
    tuned = np.array([0.2, 0.9, 0.5, 0.9, 0.5, 0.4])
    sections = detect_sections(tuned, band=0.1)
    assert sections.transition == (1, 1) and sections.shared == (0, 0) and sections.refinement == (2, 5)


def test_input_errors():
    tuned, base = paper_curves()
    with pytest.raises(ValueError, match="base_curve has 31 layers but tuned_curve has 32"):
        detect_sections(tuned, base[:31])
    with pytest.raises(ValueError, match="layers has 3 labels"):
        detect_sections(tuned, base, layers=[1, 2, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        detect_sections(tuned, base, layers=list(range(32))[::-1])
    bad = tuned.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detect_sections(bad, base)
    with pytest.raises(ValueError, match=r"\[layer\] or \[task, layer\]"):
        detect_sections(np.zeros((2, 2, 2)))
