"""Greedy decoding, with a key/value cache (default) or by re-running the whole sequence.

Both modes stop a row at its first newline or EOS token and pick the same tokens (the argmax of the
same logits, up to float rounding). The cached mode runs the prompt once and then one token per
step (:func:`tl_taskmap.kv_cache.forward_with_cache`); the uncached mode is kept as the reference.

:func:`target_logprobs_and_greedy` serves a generation task's loss and its greedy output from one pass
over each prompt: the target's tokens run once after the prompt (teacher forcing, for the loss), and
as long as greedy decoding would pick the target's next token (the argmax of those same logits), the
greedy output is read from that pass; only a row that leaves its target, or runs past it, decodes
further, from the cache rewound to where it left.

Example:
    >>> ids = greedy_token_ids(adapter, ["The capital of France is"], max_new_tokens=5)   # doctest: +SKIP
    >>> adapter.tokenizer.decode(ids[0])                                                  # doctest: +SKIP
    ' Paris'
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_taskmap.choice_scoring import continuation_token_ids, target_logprob_sums
from tl_taskmap.kv_cache import PrefixCache, forward_with_cache
from tl_taskmap.models import ModelAdapter, TokenBatch
from tl_taskmap.prompt_cache import run_prompts


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
    is_stop = _StopTokens(adapter)
    batch = adapter.tokenize(prompts, padding_side="left", prepend_bos=prepend_bos)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = None
    for step in range(max_new_tokens):
        if use_cache:
            if cache is None:
                passed = run_prompts(adapter, batch)
                last, cache = passed.last_logits, passed.cache
            else:
                logits, cache = forward_with_cache(adapter, next_ids[:, None], torch.ones_like(next_ids[:, None]), cache, last_only=True)
                last = logits[:, -1]
        else:
            last = adapter.forward(batch)[:, -1]
        next_ids: Int[Tensor, " batch"] = last.argmax(-1)
        del last
        for i, t in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if is_stop(t):
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


class _StopTokens:
    """``is_stop(token)``: EOS, or a token whose text holds a newline (decoded once per token id)."""

    def __init__(self, adapter: ModelAdapter):
        self.tokenizer = adapter.tokenizer
        self.eos = getattr(self.tokenizer, "eos_token_id", None)
        self.known: dict[int, bool] = {}

    def __call__(self, token: int) -> bool:
        if token not in self.known:
            self.known[token] = token == self.eos or "\n" in self.tokenizer.decode([token])
        return self.known[token]


def _greedy_walk(predicted: list[int], target: list[int], max_new_tokens: int, is_stop: _StopTokens) -> tuple[list[int], int, bool]:
    """Greedy tokens read off a teacher-forced pass: ``predicted[j]`` is the argmax after the prompt and ``target[:j]``.

    Returns ``(tokens, matched, more)``: the greedy tokens known so far, how many target tokens they
    follow, and whether decoding must go on (its last token then still has to be fed).
    """
    tokens: list[int] = []
    matched, following = 0, predicted[0]
    while len(tokens) < max_new_tokens and not is_stop(following):
        tokens.append(following)
        if len(tokens) == max_new_tokens:
            break
        if matched < len(target) and following == target[matched]:
            matched += 1
            following = predicted[matched]
        else:
            return tokens, matched, True
    return tokens, matched, False


@torch.no_grad()
def target_logprobs_and_greedy(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_new_tokens: int,
    *,
    prepend_bos: Optional[bool] = None,
) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"], list[list[int]]]:
    """Summed log-probability of each target after its prompt, its token count, and the greedy new token ids.

    Equals ``option_logprob_sums(adapter, prompts, [[t] for t in targets])`` and
    ``greedy_token_ids(adapter, prompts, max_new_tokens)`` (up to float rounding) from one pass over
    the prompts: the targets are fed after them at once, greedy tokens are read off those logits while
    they agree with the target, and only rows that leave the target (or pass its end without stopping)
    decode on, one token per step, from the cache rewound to where they left it.

    Raises:
        ValueError: prompts and targets do not pair up, a target has no tokens, or prompt plus target
            exceed the model's context.

    Example:
        >>> sums, counts, ids = target_logprobs_and_greedy(adapter, ["Present: go\\nPast:"], [" went"], 3)   # doctest: +SKIP
        >>> adapter.tokenizer.decode(ids[0])                                                          # doctest: +SKIP
        ' went'
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: give one target per prompt")
    prompt_batch = adapter.tokenize(prompts, padding_side="left", prepend_bos=prepend_bos)
    rows = continuation_token_ids(adapter, prompt_batch.attention_mask.sum(1).tolist(), [[t] for t in targets])  # before any forward
    passed = run_prompts(adapter, prompt_batch)
    targets_ids = [r[0] for r in rows]
    n, width = len(targets_ids), max(map(len, targets_ids))
    inputs = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(targets_ids):
        inputs[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    logits, cache = forward_with_cache(adapter, inputs, mask, passed.cache)
    # Log-probability of target token j from the logits before it: the prompt's last, then the forced tokens'.
    first = F.log_softmax(passed.last_logits.float(), dim=-1)
    sums = first[torch.arange(n, device=first.device), inputs[:, 0].to(first.device)]
    sums = sums + target_logprob_sums(logits[:, :-1], inputs[:, 1:], mask[:, 1:]).to(sums.device)
    predicted = torch.cat([passed.last_logits.argmax(-1)[:, None], logits.argmax(-1).to(passed.last_logits.device)], 1).tolist()
    del logits
    is_stop = _StopTokens(adapter)
    walks = [_greedy_walk(predicted[i], targets_ids[i], max_new_tokens, is_stop) for i in range(n)]
    generated = [tokens for tokens, _, _ in walks]
    going = [i for i, (_, _, more) in enumerate(walks) if more]
    if going:
        # Rewind each continuing row to the target tokens it followed, then decode on from its last greedy token.
        keep = cache.attention_mask.clone()
        prompt_width = keep.shape[1] - width
        for i, (_, matched, _) in enumerate(walks):
            keep[i, prompt_width + matched :] = 0
        cache = cache.with_attention_mask(keep).select_rows(torch.tensor(going))
        _decode_on(adapter, cache, going, generated, max_new_tokens, is_stop)
    counts = torch.tensor([len(ids) for ids in targets_ids])
    return sums.cpu(), counts, generated


def _decode_on(adapter: ModelAdapter, cache: PrefixCache, rows: list[int], generated: list[list[int]], max_new_tokens: int,
               is_stop: _StopTokens) -> None:
    """Greedy steps for ``rows`` (their last token in ``generated`` not yet fed), appending to ``generated`` in place."""
    while rows:
        feed = torch.tensor([[generated[i][-1]] for i in rows])
        logits, cache = forward_with_cache(adapter, feed, torch.ones_like(feed), cache, last_only=True)
        going = []
        for r, (i, token) in enumerate(zip(rows, logits[:, -1].argmax(-1).tolist())):
            if is_stop(token):
                continue
            generated[i].append(token)
            if len(generated[i]) < max_new_tokens:
                going.append(r)
        del logits
        if len(going) < len(rows):
            if going:
                cache = cache.select_rows(torch.tensor(going))
            rows = [rows[r] for r in going]
