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
from .sections import LayerSections, detect_sections
from .spectral import StreamingCovariance, dims_for_variance_from_eigenvalues

__all__ = [
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
