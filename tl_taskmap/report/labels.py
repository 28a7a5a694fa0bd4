"""The labels of the report's models (shared by the pipeline and the HTML writer, so neither imports the other).

Example:
    >>> from tl_taskmap.report.labels import MODEL_LABEL, SECOND_LABEL, CONTROL_LABEL
    >>> MODEL_LABEL, SECOND_LABEL, CONTROL_LABEL
    ('model', 'second', 'control')
"""

MODEL_LABEL, SECOND_LABEL, CONTROL_LABEL = "model", "second", "control"

__all__ = ["MODEL_LABEL", "SECOND_LABEL", "CONTROL_LABEL"]
