"""Statistics over captured activations: CKA, covariance spectra, layer sections."""

from .cka import *  # noqa: F403 - the CKA estimators, as listed once in cka.__all__
from .cka import __all__ as _cka_names
from .results import LayerStats
from .runner import compare_activations, compare_models
from .sections import LayerSections, detect_sections
from .similarity import cosine_similarity_matrix, cross_task_linear_cka, embed_2d, pca_2d, tsne_2d
from .spectral import StreamingCovariance, dims_for_variance_from_eigenvalues

__all__ = [
    "LayerStats",
    "compare_activations",
    "compare_models",
    "cosine_similarity_matrix",
    "cross_task_linear_cka",
    "embed_2d",
    "pca_2d",
    "tsne_2d",
    *_cka_names,
    "LayerSections",
    "detect_sections",
    "StreamingCovariance",
    "dims_for_variance_from_eigenvalues",
]
