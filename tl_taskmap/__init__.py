"""tl_taskmap: map where multi-task learning happens inside a TransformerLens model."""

__version__ = "0.1.0"
