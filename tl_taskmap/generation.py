"""Greedy decoding, with a key/value cache (default) or by re-running the whole sequence.

Both modes stop a row at its first newline or EOS token and pick the same tokens (the argmax of the
same logits, up to float rounding). The cached mode runs the prompt once and then one token per
step (:func:`tl_taskmap.kv_cache.forward_with_cache`); the uncached mode is kept as the reference.

Example:
    >>> ids = greedy_token_ids(adapter, ["The capital of France is"], max_new_tokens=5)   # doctest: +SKIP
    >>> adapter.tokenizer.decode(ids[0])                                                  # doctest: +SKIP
    ' Paris'
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_taskmap.kv_cache import forward_with_cache
from tl_taskmap.models import ModelAdapter, TokenBatch


@torch.no_grad()
def greedy_token_ids(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    prepend_bos: Optional[bool] = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy new token ids per prompt, stopping at a newline or EOS (neither is included).

    Args:
        adapter: The model (hooks already on it apply to every step).
        prompts: Prompt texts (left-padded together).
        max_new_tokens: Most tokens to generate per prompt.
        prepend_bos: Prepend BOS (default: the model's setting).
        use_cache: Decode with a key/value cache (default); ``False`` re-runs the whole sequence per token.

    Example:
        >>> greedy_token_ids(adapter, ["1 2 3"], 3)   # doctest: +SKIP
        [[604, 605, 606]]
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tok = adapter.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    batch = adapter.tokenize(prompts, padding_side="left", prepend_bos=prepend_bos)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops: dict[int, bool] = {}
    cache = None
    for step in range(max_new_tokens):
        if use_cache:
            if cache is None:
                logits, cache = forward_with_cache(adapter, batch.tokens, batch.attention_mask, last_only=True)
            else:
                logits, cache = forward_with_cache(adapter, next_ids[:, None], torch.ones_like(next_ids[:, None]), cache, last_only=True)
        else:
            logits = adapter.forward(batch)
        next_ids: Int[Tensor, " batch"] = logits[:, -1].argmax(-1)
        del logits
        for i, t in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if t not in stops:
                stops[t] = t == eos or "\n" in tok.decode([t])
            if stops[t]:
                done[i] = True
            else:
                new_tokens[i].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        if not use_cache:
            batch = _append_column(batch, next_ids)
    return new_tokens


def _append_column(batch: TokenBatch, next_ids: Int[Tensor, " batch"]) -> TokenBatch:
    ones = torch.ones((len(batch), 1), dtype=batch.attention_mask.dtype, device=batch.attention_mask.device)
    return TokenBatch(
        torch.cat([batch.tokens, next_ids[:, None].to(batch.tokens.device)], 1),
        torch.cat([batch.attention_mask, ones], 1),
        torch.cat([batch.target_mask, torch.zeros_like(ones, dtype=torch.bool)], 1),
        "left",
    )
