"""The answer-token loss computed from the logits at the answer-predicting positions only.

Relevance needs the per-example answer NLL and its gradient. Taking ``log_softmax`` over the whole
vocabulary at every position (and its backward) is most of the loss's cost; only the positions that
predict an answer token matter. The driver goes further for these losses: it unembeds just those
rows (:func:`tl_taskmap.driver.row_unembedding`).

Example:
    >>> import torch
    >>> from tl_taskmap.models import TokenBatch
    >>> b = TokenBatch(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[False, True, True]]), "left")
    >>> answer_predicting_positions(b).tolist()
    [[True, True, False]]
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_taskmap.evaluate import answer_nll  # noqa: F401  (the reference, used in the docstring example)
from tl_taskmap.models import TokenBatch

__all__ = ["answer_nll_at_answers", "answer_predicting_positions", "answer_nll_from_rows"]


def answer_nll_at_answers(logits: Float[Tensor, "batch pos d_vocab"], batch: TokenBatch) -> Float[Tensor, " batch"]:
    """Mean NLL of each row's answer tokens, with ``log_softmax`` taken at the answer positions only.

    Equal to :func:`tl_taskmap.evaluate.answer_nll` (same terms, same order) without the
    ``[batch, pos, d_vocab]`` float32 log-softmax over every position (and its backward).

    Example:
        >>> b = TokenBatch(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[False, True, True]]), "left")
        >>> logits = torch.randn(1, 3, 7)
        >>> torch.allclose(answer_nll_at_answers(logits, b), answer_nll(logits, b))
        True
    """
    batch = batch.to(logits.device)
    rows, cols = answer_predicting_positions(batch).nonzero(as_tuple=True)
    return answer_nll_from_rows(logits[rows, cols], rows, cols, batch)


def answer_predicting_positions(batch: TokenBatch) -> Bool[Tensor, "batch pos"]:
    """True at the positions whose logits predict an answer token (``t`` where token ``t + 1`` is a target).

    Raises:
        ValueError: a row has no answer tokens (its loss would be undefined).
    """
    n_answer = batch.target_mask.sum(1)
    if bool((n_answer == 0).any()):
        rows = torch.nonzero(n_answer == 0).flatten().tolist()
        raise ValueError(f"rows {rows[:5]} of the batch have no answer tokens, so the answer-token loss is undefined; "
                         "give every prompt a target completion or pass loss_fn=")
    predicts = torch.zeros_like(batch.target_mask)
    predicts[:, :-1] = batch.target_mask[:, 1:]
    return predicts


def answer_nll_from_rows(row_logits: Float[Tensor, "n d_vocab"], rows: Tensor, cols: Tensor, batch: TokenBatch) -> Float[Tensor, " batch"]:
    """Mean answer NLL per example from the logits at the answer-predicting positions ``(rows, cols)`` only."""
    tokens = batch.tokens.to(row_logits.device)
    logprobs = torch.log_softmax(row_logits.float(), dim=-1)
    picked = logprobs.gather(-1, tokens[rows, cols + 1, None]).squeeze(-1)
    total = torch.zeros(len(batch), dtype=picked.dtype, device=row_logits.device).index_add(0, rows, -picked)
    return total / batch.target_mask.sum(1).to(total.device)
