"""A key/value cache over both model classes: run a prefix once, then continue it.

:func:`forward_with_cache` runs new tokens after a cached prefix and returns the logits of the new
tokens plus the extended cache. Positions are counted over attended tokens only (the cumulative sum
of the attention mask, as :attr:`TokenBatch.position_ids` does), so left padding, right padding and
gaps between a padded prefix and its continuation all give the logits of the unpadded sequence.

* ``HookedTransformer`` uses its own ``TransformerLensKeyValueCache``.
* ``TransformerBridge`` uses the Hugging Face cache of the wrapped model. Its attention bridges read
  the cache from a ``past_key_values`` keyword, while transformers 5.x hands attention layers the
  cache as ``cache``; without help the cache stays empty and cached decoding silently ignores the
  prompt (the garbage text of ``TransformerBridge.generate(use_past_kv_cache=True)``). While a cached
  forward runs, a pre-hook on each ``blocks[i].attn`` passes the cache under both names; after each
  call the cache length is checked, so a release that still drops it raises
  :class:`KVCacheUnsupported` instead of returning wrong logits.

Hooks the user put on the model run in both passes and see each token's activations once (the
prefix's in the first call, the continuation's in the second), exactly as they are in a full forward.

Example:
    >>> prompt = adapter.tokenize(["The capital of France is"])                 # doctest: +SKIP
    >>> logits, cache = forward_with_cache(adapter, prompt.tokens, prompt.attention_mask)   # doctest: +SKIP
    >>> nxt = logits[:, -1:].argmax(-1)                                          # doctest: +SKIP
    >>> logits, cache = forward_with_cache(adapter, nxt, torch.ones_like(nxt), cache)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_taskmap.models import ModelAdapter


class KVCacheUnsupported(RuntimeError):
    """The model did not fill the key/value cache (a TransformerLens/transformers combination we cannot drive)."""


@dataclass
class PrefixCache:
    """Keys and values of a processed prefix, with its attention mask.

    Attributes:
        state: The backend's cache object (``TransformerLensKeyValueCache`` or a Hugging Face ``Cache``).
        attention_mask: ``[batch, prefix_len]`` mask of the cached tokens (1 = real token).
        backend: ``"hooked"`` or ``"bridge"``.
    """

    state: Any
    attention_mask: Int[Tensor, "batch prefix"]
    backend: str

    def __len__(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        """Cached positions (padding included)."""
        return int(self.attention_mask.shape[1])

    def __repr__(self) -> str:
        return f"PrefixCache({self.backend}, batch={len(self)}, length={self.length})"

    def select_rows(self, rows: Int[Tensor, " n"]) -> "PrefixCache":
        """A cache whose row ``j`` is this cache's row ``rows[j]`` (rows may repeat: one per answer option).

        The Hugging Face cache is re-indexed in place, so this cache must not be used afterwards.
        """
        mask = self.attention_mask.index_select(0, rows.to(self.attention_mask.device))
        if self.backend == "hooked":
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            entries = [
                type(e)(e.past_keys.index_select(0, rows.to(e.past_keys.device)), e.past_values.index_select(0, rows.to(e.past_values.device)))
                for e in self.state.entries
            ]
            state = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask.to(self.state.previous_attention_mask))
            return PrefixCache(state, mask, self.backend)
        self.state.batch_select_indices(rows.to(self.attention_mask.device))
        return PrefixCache(self.state, mask, self.backend)

    def with_attention_mask(self, attention_mask: Int[Tensor, "batch prefix"]) -> "PrefixCache":
        """The same keys and values under another mask of the same shape (0 hides a cached token from later ones).

        Positions of later tokens are counted over the tokens the mask keeps, so hiding the tail of a row
        rewinds it: continuing then equals continuing the shorter prefix. This cache must not be used afterwards.
        """
        if attention_mask.shape != self.attention_mask.shape:
            raise ValueError(f"the new mask has shape {tuple(attention_mask.shape)}, the cache {tuple(self.attention_mask.shape)}")
        if self.backend == "hooked":
            self.state.previous_attention_mask = attention_mask.to(self.state.previous_attention_mask)
        return PrefixCache(self.state, attention_mask, self.backend)


def forward_with_cache(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "batch new"],
    attention_mask: Int[Tensor, "batch new"],
    cache: Optional[PrefixCache] = None,
    *,
    last_only: bool = False,
) -> tuple[Float[Tensor, "batch new d_vocab"], PrefixCache]:
    """Logits of ``tokens`` continuing the cached prefix (or starting one), and the extended cache.

    ``last_only=True`` returns the logits of the last column only (``[batch, 1, d_vocab]``) and skips
    the unembedding of the other positions, as Hugging Face ``generate`` does (``logits_to_keep=1``).

    Args:
        adapter: The model.
        tokens: New token ids; padding anywhere is allowed where ``attention_mask`` is 0.
        attention_mask: Mask of the new tokens only (the prefix's mask is kept in ``cache``).
        cache: The prefix; ``None`` starts a new cache.

    Raises:
        KVCacheUnsupported: the model did not extend the cache (nothing returned is then trustworthy).
        ValueError: ``tokens`` and ``cache`` have different batch sizes.
    """
    device = adapter.device
    tokens, attention_mask = tokens.to(device), attention_mask.to(device).long()
    if cache is not None and len(cache) != tokens.shape[0]:
        raise ValueError(f"the cache holds {len(cache)} rows but {tokens.shape[0]} rows of tokens were given; select_rows() first")
    prefix_mask = cache.attention_mask.to(device) if cache is not None else attention_mask[:, :0]
    full_mask = torch.cat([prefix_mask, attention_mask], 1)
    if adapter.backend == "hooked":
        logits, state = _hooked_forward(adapter, tokens, attention_mask, cache, last_only)
    else:
        logits, state = _bridge_forward(adapter, tokens, full_mask, cache, last_only)
    new_cache = PrefixCache(state, full_mask, adapter.backend)
    cached = _cached_length(new_cache)
    if cached != full_mask.shape[1]:
        raise KVCacheUnsupported(
            f"the model cached {cached} positions after a forward over {full_mask.shape[1]}: this TransformerLens/"
            "transformers combination does not fill the key/value cache; evaluate with fast=False"
        )
    return logits, new_cache


def _hooked_forward(adapter: ModelAdapter, tokens: Tensor, new_mask: Tensor, cache: Optional[PrefixCache], last_only: bool) -> tuple[Tensor, Any]:
    if cache is None:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        state = TransformerLensKeyValueCache.init_cache(adapter.model.cfg, adapter.model.cfg.device, tokens.shape[0])
    else:
        state = cache.state
    # HookedTransformer appends new_mask to the cached mask and counts positions over the whole mask.
    model = adapter.model
    if not last_only:
        return model(tokens, attention_mask=new_mask, past_kv_cache=state, return_type="logits"), state
    # Stop after the last block, then run the final norm and unembedding on the last column only.
    residual = model(tokens, attention_mask=new_mask, past_kv_cache=state, stop_at_layer=adapter.n_layers)[:, -1:]
    return hooked_unembed(model, residual), state


def hooked_unembed(model: Any, residual: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
    """What ``HookedTransformer.forward`` does after its last block: final norm, unembedding, soft cap."""
    if getattr(model.cfg, "normalization_type", None) is not None:
        residual = model.ln_final(residual)
    logits = model.unembed(residual)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _bridge_forward(adapter: ModelAdapter, tokens: Tensor, full_mask: Tensor, cache: Optional[PrefixCache], last_only: bool) -> tuple[Tensor, Any]:
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, full_mask.shape[1] - tokens.shape[1] :]
    kwargs: dict[str, Any] = {"use_cache": True}
    if last_only and "logits_to_keep" in _hf_forward_parameters(adapter):
        kwargs["logits_to_keep"] = 1
    if cache is not None:
        kwargs[_hf_cache_keyword(adapter)] = cache.state
    with _attention_sees_cache(adapter):
        logits, state = adapter.model(tokens, attention_mask=full_mask, position_ids=position_ids, return_type="logits_and_cache", **kwargs)
    return (logits[:, -1:] if last_only else logits), state


def _hf_forward_parameters(adapter: ModelAdapter) -> frozenset[str]:
    """Keyword names the wrapped Hugging Face model's ``forward`` takes (kept on the adapter)."""
    import inspect

    names = adapter.__dict__.get("_hf_forward_parameter_cache")
    if names is None:
        hf_model = getattr(adapter.model, "original_model", None)
        try:
            names = frozenset(inspect.signature(hf_model.forward).parameters) if hf_model is not None else frozenset()
        except (TypeError, ValueError):
            names = frozenset()
        adapter.__dict__["_hf_forward_parameter_cache"] = names
    return names


def _hf_cache_keyword(adapter: ModelAdapter) -> str:
    """``cache`` where the wrapped Hugging Face model takes it (transformers >= 5.x), else ``past_key_values``."""
    return "cache" if "cache" in _hf_forward_parameters(adapter) else "past_key_values"


def _cached_length(cache: PrefixCache) -> int:
    if cache.backend == "hooked":
        return int(cache.state.entries[0].past_keys.shape[1]) if cache.state.entries else cache.length
    if cache.state is None:
        return -1
    return int(cache.state.get_seq_length())


@contextlib.contextmanager
def _attention_sees_cache(adapter: ModelAdapter) -> Iterator[None]:
    """Pass the layer cache as ``past_key_values`` to the bridge's attention modules (see the module doc)."""

    def pass_cache(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    handles = []
    try:
        for block in getattr(adapter.model, "blocks", []):
            attn = getattr(block, "attn", None)
            if isinstance(attn, torch.nn.Module):
                handles.append(attn.register_forward_pre_hook(pass_cache, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
