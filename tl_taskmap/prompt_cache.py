"""One pass over a batch of prompts into a key/value cache, their common token prefix run once.

Few-shot prompts repeat their demonstrations: every prompt of a task may start with the same dozens of
tokens. :func:`run_prompts` finds the longest token prefix that all prompts of a batch share, runs it
once (one row), copies its keys and values to every row, and runs only each prompt's own tokens after
it. Positions are counted over real tokens (:mod:`tl_taskmap.kv_cache`), so a shorter prompt's own
tokens, left-padded after the shared prefix, sit at the positions they have in the unpadded prompt:
the logits equal those of the plain left-padded pass up to float rounding, on both model classes.

Hooks on the model see the shared prefix once, as a one-row tensor, and each prompt's own tokens
once; hooks that act per token (ablation, steering) therefore change the logits exactly as in the
plain pass. Prefixes shorter than :data:`MIN_SHARED_TOKENS` are not worth a separate forward and run
with the rest.

Example:
    >>> from tl_taskmap.prompt_cache import common_prefix_length
    >>> common_prefix_length([[1, 5, 6, 7], [1, 5, 6, 9, 9], [1, 5, 6, 7, 2]])
    3
    >>> passed = run_prompts(adapter, ["Q: 2+2\\nA: 4\\n\\nQ: 3+3\\nA:", "Q: 2+2\\nA: 4\\n\\nQ: 1+5\\nA:"])   # doctest: +SKIP
    >>> passed.last_logits.shape, passed.cache                                                         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_taskmap.kv_cache import PrefixCache, forward_with_cache
from tl_taskmap.models import ModelAdapter, TokenBatch

__all__ = ["MIN_SHARED_TOKENS", "PromptPass", "common_prefix_length", "run_prompts"]

#: A shared prefix shorter than this runs with the rest of each prompt (a separate pass costs more than it saves).
MIN_SHARED_TOKENS = 4


@dataclass
class PromptPass:
    """What one pass over a batch of prompts leaves: the next-token logits and the cache to continue from.

    Attributes:
        last_logits: ``[batch, d_vocab]`` logits at each prompt's last token.
        cache: Keys and values of every prompt (its mask may have gaps between a shared prefix and the
            rest; positions are counted over real tokens).
        batch: The prompts tokenized and left-padded as a whole (what the plain pass would run).
        shared: Tokens run once for the whole batch (0: none).
    """

    last_logits: Float[Tensor, "batch d_vocab"]
    cache: PrefixCache
    batch: TokenBatch
    shared: int

    @property
    def lengths(self) -> list[int]:
        """Tokens per prompt (BOS included)."""
        return self.batch.attention_mask.sum(1).tolist()


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that every row starts with.

    Example:
        >>> common_prefix_length([[1, 2, 3], [1, 2, 4]]), common_prefix_length([[1], [2]]), common_prefix_length([[7, 8]])
        (2, 0, 2)
    """
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for k in range(n):
        if any(r[k] != first[k] for r in rows[1:]):
            return k
    return n


def run_prompts(adapter: ModelAdapter, prompts: Sequence[str] | TokenBatch, *, prepend_bos: Optional[bool] = None,
                share_prefix: bool = True) -> PromptPass:
    """Run ``prompts`` once (left-padded), their common token prefix once for the batch; logits at the last token.

    Args:
        adapter: The model (hooks already on it apply).
        prompts: Prompt texts, or a left-padded :class:`~tl_taskmap.models.TokenBatch` of them (tokenized once by the caller).
        prepend_bos: Prepend BOS (default: the model's setting; unused with a TokenBatch).
        share_prefix: Run a common prefix of :data:`MIN_SHARED_TOKENS` or more tokens once (default);
            ``False`` runs the plain left-padded batch.

    Example:
        >>> passed = run_prompts(adapter, ["Word: good\\nSentiment:", "Word: bad\\nSentiment:"])   # doctest: +SKIP
        >>> passed.last_logits.argmax(-1)                                                   # doctest: +SKIP
    """
    if isinstance(prompts, TokenBatch):
        if prompts.padding_side != "left":
            raise ValueError("run_prompts needs a left-padded batch (each prompt's last token in the last column)")
        batch = prompts
    else:
        batch = adapter.tokenize(prompts, padding_side="left", prepend_bos=prepend_bos)
    lengths = batch.attention_mask.sum(1).tolist()
    width = batch.tokens.shape[1]
    rows = [batch.tokens[i, width - n :].tolist() for i, n in enumerate(lengths)]
    # Every prompt keeps at least one token of its own: its logits are read from the second pass.
    shared = min(common_prefix_length(rows), min(lengths) - 1) if share_prefix and len(rows) > 1 else 0
    if shared < MIN_SHARED_TOKENS:
        logits, cache = forward_with_cache(adapter, batch.tokens, batch.attention_mask, last_only=True)
        return PromptPass(logits[:, -1], cache, batch, 0)
    prefix = torch.tensor([rows[0][:shared]])
    _, cache = forward_with_cache(adapter, prefix, torch.ones_like(prefix), last_only=True)
    cache = cache.select_rows(torch.zeros(len(rows), dtype=torch.long))
    # Each prompt's own tokens, left-padded: the last columns of the padded batch, prefix columns masked out.
    own = [n - shared for n in lengths]
    rest = max(own)
    columns = torch.arange(rest)
    mask = torch.stack([(columns >= rest - k).long() for k in own])
    pad = getattr(adapter.tokenizer, "pad_token_id", None)
    tokens = batch.tokens[:, width - rest :].masked_fill(mask == 0, 0 if pad is None else int(pad))
    logits, cache = forward_with_cache(adapter, tokens, mask, cache, last_only=True)
    return PromptPass(logits[:, -1], cache, batch, shared)
