"""What the distributed tests' ranks and the single-process reference share: tasks, models, options."""

from __future__ import annotations

from typing import Any

import torch

from tl_taskmap.tasks import Task

# Uneven task sizes, so shards end in partial batches and blocks.
COMPARE_KW: dict[str, Any] = dict(sites=["resid_post", "mlp_out"], batch_size=4, max_samples_per_task=6, seed=3)
RELEVANCE_KW: dict[str, Any] = dict(batch_size=4)

WORDS = "the quick brown fox jumps over lazy dog movie great bad good awful review".split()


def suite() -> list[Task]:
    def prompts(n: int, shift: int) -> list[str]:
        return [" ".join(WORDS[(i * 7 + j * 3 + shift) % len(WORDS)] for j in range(2 + (i + shift) % 5)) + " Answer:" for i in range(n)]

    return [
        Task.from_lists("alpha", prompts(18, 0), [" yes", " no"] * 9, options=[" yes", " no"], cluster="c1"),
        Task.from_lists("beta", prompts(10, 5), [" true"] * 10, options=[" true", " false"], cluster="c2"),
    ]


def _perturbed(folder: str, seed: int) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(folder, device="cpu")
    model.eval()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def models(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two models sharing a tokenizer, plus a control model for task "alpha" only."""
    return {"a": _perturbed(folder, 0), "b": _perturbed(folder, 1)}, {"alpha": _perturbed(folder, 2)}
