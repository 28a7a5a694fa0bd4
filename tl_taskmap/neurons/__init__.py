"""Task-specific neurons (and attention heads): relevance, unit sets, overlap, parameter similarity, ablation, fine-tuning."""

from .ablation import AblationEffect, ablate, ablation_effect, ablation_effects, mean_activations
from .ablation_effects import AblationMatrix, ablation_matrix, matched_random_sets, plot_ablation_matrix, specificity
from .head_ablation import ablate_heads, head_mean_activations
from .head_attribution import GradXActHeadRelevance, HeadRelevanceScores, head_relevance, relevance_with_heads
from .masked_training import FinetuneResult, finetune, load_control_model, save_control_model, train_control_model, trainable_neurons
from .ncft import ContinualResult, backward_transfer, compare_methods, continual_learning, forgetting_fg
from .overlap import jaccard_matrix, overlap_sweep
from .attribution import GradXActRelevance, RelevanceScores, relevance, relevance_by_task
from .sets import HeadSet, NeuronSet
from .similarity import parameter_similarity, parameter_similarity_matrix

__all__ = [
    "AblationEffect",
    "AblationMatrix",
    "ablate",
    "ablation_effect",
    "ablation_effects",
    "ablation_matrix",
    "matched_random_sets",
    "mean_activations",
    "plot_ablation_matrix",
    "specificity",
    "ContinualResult",
    "FinetuneResult",
    "GradXActRelevance",
    "NeuronSet",
    "RelevanceScores",
    "backward_transfer",
    "compare_methods",
    "continual_learning",
    "finetune",
    "forgetting_fg",
    "jaccard_matrix",
    "load_control_model",
    "overlap_sweep",
    "parameter_similarity",
    "parameter_similarity_matrix",
    "relevance",
    "relevance_by_task",
    "save_control_model",
    "train_control_model",
    "trainable_neurons",
    "GradXActHeadRelevance",
    "HeadRelevanceScores",
    "HeadSet",
    "ablate_heads",
    "head_mean_activations",
    "head_relevance",
    "relevance_with_heads",
]

from .selection import Selection, select_all, select_neurons  # noqa: E402
from .selection_compare import SelectionComparison, compare_selections  # noqa: E402

__all__ += ["Selection", "SelectionComparison", "compare_selections", "select_all", "select_neurons"]
