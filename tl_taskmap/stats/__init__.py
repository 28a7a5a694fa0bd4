"""Statistics over captured activations: CKA, covariance spectra, layer sections."""

from .cka import (
    StreamingLinearCKA,
    center_gram,
    cka_from_grams,
    feature_space_linear_cka,
    gram_linear,
    gram_rbf,
    linear_cka,
)
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
    "StreamingLinearCKA",
    "center_gram",
    "cka_from_grams",
    "feature_space_linear_cka",
    "gram_linear",
    "gram_rbf",
    "linear_cka",
    "LayerSections",
    "detect_sections",
    "StreamingCovariance",
    "dims_for_variance_from_eigenvalues",
]
