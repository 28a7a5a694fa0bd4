"""Multiple-choice option scores from one pass over each prompt.

Scoring option ``k`` of a prompt needs ``log p(option_k | prompt)``. Running ``prompt + option`` once
per option repeats the prompt K times. Here the prompts run once (keeping their key/value cache, and
running a token prefix they all share once: :mod:`tl_taskmap.prompt_cache`);
the first token of every option is read from the logits at the prompt's last token, and only options
of two or more tokens continue from the cached prompt, feeding their tokens but the last. The
result equals the per-option full forward (same tokens, same positions, same attention) up to
float rounding, on both model classes and with either padding side.

Hooks on the model see each prompt token once and each option token except the last (whose
activations cannot change any scored logit). Hooks that act per token (ablation, steering, patching
by value) therefore change the scores exactly as in the full forward; a hook that indexes absolute
tensor positions sees the prompt pass and the option pass as separate tensors.

Example:
    >>> sums, counts = option_logprob_sums(adapter, ["2 + 2 ="], [[" 4", " five"]])   # doctest: +SKIP
    >>> sums / counts        # mean log-probability per option token, in (example, option) order   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_taskmap.kv_cache import forward_with_cache
from tl_taskmap.models import ModelAdapter, PaddingSide
from tl_taskmap.prompt_cache import run_prompts


def continuation_token_ids(adapter: ModelAdapter, prompt_lengths: Sequence[int], options: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Each option's token ids (per example, per option), checked: no empty option, none past the model's context.

    Example:
        >>> continuation_token_ids(adapter, [5], [[" yes", " no"]])   # doctest: +SKIP
        [[[3763], [645]]]
    """
    tok = adapter.tokenizer
    option_ids = [[list(tok.encode(o, add_special_tokens=False)) for o in opts] for opts in options]
    for i, ids in enumerate(option_ids):
        for k, row in enumerate(ids):
            if not row:
                raise ValueError(f"option {k} of example {i} ({options[i][k]!r}) has no tokens: every option needs at least one")
            if adapter.n_ctx is not None and prompt_lengths[i] + len(row) > adapter.n_ctx:
                raise ValueError(
                    f"prompt {i} with option {k} is {prompt_lengths[i] + len(row)} tokens long, longer than the model's context "
                    f"of {adapter.n_ctx} tokens; shorten it or truncate the task's prompts"
                )
    return option_ids


def target_logprob_sums(
    logits: Float[Tensor, "rows pos d_vocab"], targets: Int[Tensor, "rows pos"], mask: Int[Tensor, "rows pos"]
) -> Float[Tensor, " rows"]:
    """Per row, the summed ``log_softmax(logits)[target]`` over the positions where ``mask`` is 1.

    The float32 log-softmax runs at those positions only, not over the vocabulary at every position.

    Example:
        >>> logits = torch.zeros(1, 2, 4)   # uniform over 4 tokens
        >>> target_logprob_sums(logits, torch.tensor([[1, 3]]), torch.tensor([[1, 0]]))
        tensor([-1.3863])
    """
    real = mask.bool().to(logits.device)
    picked = F.log_softmax(logits[real].float(), dim=-1).gather(-1, targets.to(logits.device)[real][:, None]).squeeze(-1)
    per_row = torch.zeros(tuple(mask.shape), dtype=picked.dtype, device=picked.device)
    per_row[real] = picked
    return per_row.sum(1)


def option_logprob_sums(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    *,
    padding_side: PaddingSide = "left",
    prepend_bos: Optional[bool] = None,
) -> tuple[Float[Tensor, " rows"], Int[Tensor, " rows"]]:
    """Summed log-probability of each option's tokens after its prompt, and each option's token count.

    Args:
        adapter: The model (hooks already on it apply).
        prompts: One prompt per example.
        options: Per example, its answer options (any number each).
        padding_side: Padding of the prompt pass (scores do not depend on it).
        prepend_bos: Prepend BOS to prompts (default: the model's setting).

    Returns:
        ``(logprob_sums, n_tokens)``, float32 on the CPU, one entry per (example, option) in order.

    Raises:
        ValueError: prompts and options do not pair up, an option has no tokens, or prompt plus
            option exceed the model's context.

    Example:
        >>> sums, counts = option_logprob_sums(adapter, ["good film:", "bad film:"], [[" yes", " no"]] * 2)   # doctest: +SKIP
    """
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists: give one list of options per prompt")
    prompt_batch = adapter.tokenize(prompts, padding_side=padding_side, prepend_bos=prepend_bos)
    option_ids = continuation_token_ids(adapter, prompt_batch.attention_mask.sum(1).tolist(), options)  # checked before any forward
    if padding_side == "left":  # every prompt ends in the last column: unembed that column only; a shared prefix runs once
        passed = run_prompts(adapter, prompt_batch)
        last, cache = passed.last_logits, passed.cache
    else:
        logits, cache = forward_with_cache(adapter, prompt_batch.tokens, prompt_batch.attention_mask)
        last = logits[torch.arange(len(prompts), device=logits.device), prompt_batch.last_index.to(logits.device)]
        del logits
    example_of_row = [i for i, ids in enumerate(option_ids) for _ in ids]
    rows = [row for ids in option_ids for row in ids]
    device = adapter.device

    first_logprobs = F.log_softmax(last.float(), dim=-1)
    row_example = torch.tensor(example_of_row, device=first_logprobs.device)
    first_token = torch.tensor([r[0] for r in rows], device=first_logprobs.device)
    sums = first_logprobs[row_example, first_token]

    longer = [j for j, r in enumerate(rows) if len(r) > 1]
    if longer:
        # Option rows of two or more tokens continue from their prompt's cache: inputs are the
        # option's tokens but the last, targets the tokens after each input.
        width = max(len(rows[j]) for j in longer) - 1
        pad = 0
        inputs = torch.full((len(longer), width), pad, dtype=torch.long)
        targets = torch.zeros((len(longer), width), dtype=torch.long)
        mask = torch.zeros((len(longer), width), dtype=torch.long)
        for n, j in enumerate(longer):
            r = rows[j]
            inputs[n, : len(r) - 1] = torch.tensor(r[:-1])
            targets[n, : len(r) - 1] = torch.tensor(r[1:])
            mask[n, : len(r) - 1] = 1
        branch = cache.select_rows(torch.tensor([example_of_row[j] for j in longer], device=device))
        cont_logits, _ = forward_with_cache(adapter, inputs, mask, branch)
        continued = target_logprob_sums(cont_logits, targets, mask)
        del cont_logits
        sums = sums.index_add(0, torch.tensor(longer, device=sums.device), continued.to(sums.device))
    counts = torch.tensor([len(r) for r in rows])
    return sums.cpu(), counts
