"""One adapter over TransformerLens's two model classes.

``HookedTransformer`` (TransformerLens 2.x/3.x) and ``TransformerBridge`` (3.x/4.x) expose the same
hook names (``blocks.{l}.hook_resid_post``, ``blocks.{l}.mlp.hook_post``, ...) but differ in how they
take padding, where their MLP parameters live and how weights are laid out. Everything else in
tl_taskmap talks to a model only through :class:`ModelAdapter`, so that those differences live here.

Example:
    >>> from tl_taskmap.models import as_adapter
    >>> adapter = as_adapter(model)                        # doctest: +SKIP
    >>> batch = adapter.tokenize(["The cat", "A much longer prompt"], padding_side="left")  # doctest: +SKIP
    >>> logits = adapter.forward(batch)                     # doctest: +SKIP
    >>> adapter.hook_name(3, "resid_post")                  # doctest: +SKIP
    'blocks.3.hook_resid_post'
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_taskmap.hooks import find_hook_point, tl_hooks

PaddingSide = Literal["left", "right"]

#: Short site names → hook-name templates, identical on both model classes.
SITE_TEMPLATES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
}
#: Aliases users type.
SITE_ALIASES: dict[str, str] = {"neurons": "mlp_post", "mlp.hook_post": "mlp_post", "mlp.hook_pre": "mlp_pre",
                                "post": "mlp_post", "pre": "mlp_pre"}  # "post"/"pre": TransformerLens get_act_name short names
for _site, _template in list(SITE_TEMPLATES.items()):
    SITE_ALIASES.setdefault(_template.split("{layer}.", 1)[1], _site)


class UnsupportedModelError(TypeError):
    """The model is not a TransformerLens model this adapter understands."""


@dataclass(frozen=True)
class NeuronParam:
    """One parameter tensor that holds a slice per MLP neuron.

    Neuron ``j`` of the layer owns ``param.select(dim, j)``.

    Attributes:
        role: ``"W_in"``, ``"W_gate"``, ``"b_in"`` or ``"W_out"``.
        param: The parameter itself (a view into the model: editing it edits the model).
        dim: The dimension of ``param`` indexed by neuron.
    """

    role: str
    param: torch.nn.Parameter
    dim: int

    def neuron_slice(self, index: Int[Tensor, " k"] | int) -> Tensor:
        """The neurons' slices, neuron axis first: ``[k, ...]``."""
        return self.param.detach().index_select(self.dim, torch.as_tensor(index, device=self.param.device).reshape(-1)).movedim(self.dim, 0)


@dataclass
class TokenBatch:
    """Tokenized prompts (optionally followed by completions), padded on one side.

    Attributes:
        tokens: Token ids, padded with the tokenizer's pad id.
        attention_mask: 1 for real tokens, 0 for padding.
        target_mask: True where the token belongs to the completion (the answer), else False.
        padding_side: Which side the padding is on.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    target_mask: Bool[Tensor, "batch pos"]
    padding_side: PaddingSide

    @property
    def position_ids(self) -> Int[Tensor, "batch pos"]:
        """Positions counted over real tokens only, so left padding does not shift them."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def last_index(self) -> Int[Tensor, " batch"]:
        """Index of each row's last real token."""
        pos = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (pos * self.attention_mask.long()).argmax(-1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device), self.target_mask.to(device), self.padding_side)


def _is_hooked_transformer(model: Any) -> bool:
    return any(cls.__name__ == "HookedTransformer" for cls in type(model).__mro__)


def _is_bridge(model: Any) -> bool:
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


class ModelAdapter:
    """A thin, uniform view of a ``HookedTransformer`` or ``TransformerBridge``.

    Args:
        model: The TransformerLens model. It is used as is (never copied, never re-processed).

    Attributes:
        model: The wrapped model.
        backend: ``"hooked"`` or ``"bridge"``.
        n_layers, d_model, d_mlp, n_ctx, d_vocab: Sizes from the model's config.

    Example:
        >>> adapter = ModelAdapter(model)   # doctest: +SKIP
        >>> adapter                          # doctest: +SKIP
        ModelAdapter(bridge LlamaForCausalLM, n_layers=30, d_model=576, d_mlp=1536, gated MLP)
    """

    def __init__(self, model: Any):
        if isinstance(model, ModelAdapter):
            model = model.model
        if _is_hooked_transformer(model):
            self.backend = "hooked"
        elif _is_bridge(model):
            self.backend = "bridge"
        else:
            raise UnsupportedModelError(
                f"tl_taskmap needs a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}. "
                "Load a Hugging Face model with `TransformerBridge.boot_transformers(name_or_local_dir)`."
            )
        self.model = model
        cfg = model.cfg
        missing = [k for k in ("n_layers", "d_model") if getattr(cfg, k, None) is None]
        if missing:
            raise UnsupportedModelError(f"the model's cfg lacks {missing}; tl_taskmap needs a decoder with numbered blocks.")
        self.n_layers: int = int(cfg.n_layers)
        self.d_model: int = int(cfg.d_model)
        self.d_mlp: Optional[int] = int(cfg.d_mlp) if getattr(cfg, "d_mlp", None) else None
        self.n_ctx: Optional[int] = int(cfg.n_ctx) if getattr(cfg, "n_ctx", None) else None
        self.d_vocab: int = int(cfg.d_vocab)
        self.gated_mlp: bool = bool(getattr(cfg, "gated_mlp", False))

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        inner = type(getattr(self.model, "original_model", self.model)).__name__
        mlp = "gated MLP" if self.gated_mlp else "MLP"
        return (
            f"ModelAdapter({self.backend} {inner}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_mlp={self.d_mlp}, {mlp}, device={self.device}, dtype={self.dtype})"
        )

    @property
    def tokenizer(self) -> Any:
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            raise ValueError("the model has no tokenizer; pass one when loading it (e.g. `tokenizer=` in boot_transformers).")
        return tok

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where token ids must go).

        The first parameter not on ``meta``: with a ``device_map`` that offloads the embedding to disk,
        its parameter is a ``meta`` placeholder and accelerate moves inputs to the execution device.
        """
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def default_prepend_bos(self) -> bool:
        return bool(getattr(self.model.cfg, "default_prepend_bos", True))

    # ------------------------------------------------------------------ hooks
    @property
    def hook_dict(self) -> dict[str, Any]:
        return dict(self.model.hook_dict)

    def hook_name(self, layer: int, site: str) -> str:
        """The TransformerLens hook name of ``site`` at ``layer``.

        Args:
            layer: Block index, 0-based (negative counts from the end).
            site: One of ``SITE_TEMPLATES`` (``"resid_post"``, ``"mlp_post"``, ...), an alias such as
                ``"neurons"`` or ``"hook_resid_post"``.
        """
        canonical = SITE_ALIASES.get(site, site)
        if canonical not in SITE_TEMPLATES:
            options = sorted(set(SITE_TEMPLATES) | set(SITE_ALIASES))
            close = difflib.get_close_matches(site, options, n=4)
            raise ValueError(f"unknown site {site!r}; closest valid sites: {close or options}")
        if not -self.n_layers <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for a model with n_layers={self.n_layers}")
        name = SITE_TEMPLATES[canonical].format(layer=layer % self.n_layers)
        if name not in self._hook_names:
            self.hook_point(name)  # raises, listing the closest valid names
        return name

    @property
    def _hook_names(self) -> frozenset[str]:
        # The bridge rebuilds hook_dict on every access (~1 ms); hook names never change, so keep them.
        names = self.__dict__.get("_hook_name_cache")
        if names is None:
            names = self.__dict__["_hook_name_cache"] = frozenset(self.model.hook_dict)
        return names

    def hook_point(self, name: str, hook_dict: Optional[dict[str, Any]] = None) -> torch.nn.Module:
        """The HookPoint module called ``name``; unknown names list the closest valid ones."""
        return find_hook_point(self.model, name, hook_dict)

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str, Callable[..., Any]]],
        bwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
    ) -> contextlib.AbstractContextManager:
        """Add TransformerLens hooks for the duration of a ``with`` block; they are always removed.

        Hook functions take ``(activation, hook)`` like TransformerLens hooks and may return a
        replacement activation. They are added through ``HookPoint.add_hook`` at a new hook-context
        level (:func:`tl_taskmap.hooks.tl_hooks`), so ``model.hook_dict[name].fwd_hooks`` lists them,
        ``model.reset_hooks()`` removes them and the user's own ``model.hooks(...)`` contexts nest
        with them; on exit exactly the hooks added here are removed.

        Example:
            >>> with adapter.hooks([("blocks.0.hook_resid_post", lambda x, hook: x * 0)]):   # doctest: +SKIP
            ...     logits = adapter.forward(batch)
        """
        return tl_hooks(self.model, fwd_hooks, bwd_hooks)

    # ------------------------------------------------------------------ tokens
    def tokenize(
        self,
        prompts: Sequence[str],
        completions: Optional[Sequence[str]] = None,
        *,
        padding_side: PaddingSide = "left",
        prepend_bos: Optional[bool] = None,
        max_length: Optional[int] = None,
    ) -> TokenBatch:
        """Tokenize prompts (and optional completions appended to them) with an attention mask.

        Prompt and completion are tokenized separately and concatenated, so the completion's tokens
        are exactly those the model is scored on (``target_mask``).

        Args:
            prompts: Prompt texts.
            completions: Optional texts appended after each prompt (e.g. " positive").
            padding_side: ``"left"`` (default; the last prompt token is then at position -1) or ``"right"``.
            prepend_bos: Prepend the BOS token; defaults to the model's ``cfg.default_prepend_bos``.
            max_length: Longest allowed row; defaults to the model's context length ``n_ctx``.

        Raises:
            ValueError: no prompts, mismatched completions, or a row longer than ``max_length``.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to tokenize: pass at least one prompt (is the task empty?)")
        if completions is not None and len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up one to one")
        tok = self.tokenizer
        prepend_bos = self.default_prepend_bos if prepend_bos is None else prepend_bos
        bos = getattr(tok, "bos_token_id", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None) or 0
        max_length = max_length or self.n_ctx
        rows: list[list[int]] = []
        n_target: list[int] = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, expected str")
            ids = list(tok.encode(prompt, add_special_tokens=False))
            if prepend_bos and bos is not None:
                ids = [bos] + ids
            extra = list(tok.encode(completions[i], add_special_tokens=False)) if completions is not None else []
            if not ids and not extra:
                raise ValueError(f"prompt {i} is empty and no BOS token is prepended: nothing to run")
            if max_length is not None and len(ids) + len(extra) > max_length:
                raise ValueError(
                    f"prompt {i} is {len(ids) + len(extra)} tokens long, longer than the model's context of "
                    f"{max_length} tokens; shorten it or truncate the task's prompts"
                )
            rows.append(ids + extra)
            n_target.append(len(extra))
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, k) in enumerate(zip(rows, n_target)):
            start = width - len(row) if padding_side == "left" else 0
            tokens[i, start : start + len(row)] = torch.tensor(row)
            mask[i, start : start + len(row)] = 1
            if k:
                target[i, start + len(row) - k : start + len(row)] = True
        return TokenBatch(tokens, mask, target, padding_side)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: TokenBatch, **kwargs: Any) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits for a padded batch, with padding handled correctly on both model classes.

        On the bridge the position ids are passed explicitly, because derived positions ignored the
        attention mask in some TransformerLens releases (left padding then silently changed logits).
        """
        batch = batch.to(self.device)
        if self.backend == "hooked":
            return self.model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits", **kwargs)
        return self.model(
            batch.tokens,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            return_type="logits",
            **kwargs,
        )

    # ------------------------------------------------------------------ neuron params
    def neuron_params(self, layer: int) -> list[NeuronParam]:
        """The parameters that belong to MLP neurons of ``layer``.

        Neuron ``j`` is index ``j`` of the MLP hidden layer (the input of the output projection, which
        is ``mlp.hook_post``). It owns: its input-weight column (``W_in``), its gate column for gated
        MLPs (``W_gate``), its input bias (``b_in``, if any) and its output-weight row (``W_out``).

        Raises:
            UnsupportedModelError: the MLP's layout is not one tl_taskmap knows, naming what is missing.
        """
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for n_layers={self.n_layers}")
        mlp = self.model.blocks[layer].mlp
        params = _hooked_neuron_params(mlp) if self.backend == "hooked" else _bridge_neuron_params(mlp)
        roles = {p.role for p in params}
        if "W_in" not in roles or "W_out" not in roles or (self.gated_mlp and "W_gate" not in roles):
            raise UnsupportedModelError(
                f"could not find the MLP neuron parameters of layer {layer} ({type(mlp).__name__}); found roles "
                f"{sorted(roles)}, need W_in, W_out{' and W_gate' if self.gated_mlp else ''}"
            )
        for p in params:
            if p.param.shape[p.dim] != self.d_mlp:
                raise UnsupportedModelError(
                    f"layer {layer} {p.role} has {p.param.shape[p.dim]} neurons along dim {p.dim}, expected d_mlp={self.d_mlp}"
                )
        return params

    def neuron_vectors(self, layer: int, neurons: Int[Tensor, " k"]) -> Float[Tensor, "k n_params_per_neuron"]:
        """Each neuron's parameters (all roles) concatenated into one vector per neuron."""
        return torch.cat([p.neuron_slice(neurons).reshape(len(neurons), -1).float() for p in self.neuron_params(layer)], dim=1)


def _hooked_neuron_params(mlp: torch.nn.Module) -> list[NeuronParam]:
    # HookedTransformer: W_in/W_gate [d_model, d_mlp], b_in [d_mlp], W_out [d_mlp, d_model].
    layout = [("W_in", "W_in", 1), ("W_gate", "W_gate", 1), ("b_in", "b_in", 0), ("W_out", "W_out", 0)]
    return [NeuronParam(role, getattr(mlp, attr), dim) for role, attr, dim in layout if isinstance(getattr(mlp, attr, None), torch.nn.Parameter)]


def _bridge_neuron_params(mlp: torch.nn.Module) -> list[NeuronParam]:
    # TransformerBridge: the MLP's "in"/"gate"/"out" sub-bridges wrap the HF Linear (weight [out, in])
    # or GPT-2 Conv1D (weight [in, out]) modules.
    found: list[NeuronParam] = []
    for part, role_w, role_b in (("in", "W_in", "b_in"), ("gate", "W_gate", None), ("out", "W_out", None)):
        sub = getattr(mlp, part, None)
        if sub is None:
            continue
        inner = getattr(sub, "_original_component", sub)
        weight = getattr(inner, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        conv1d = type(inner).__name__ == "Conv1D"  # weight stored [in_features, out_features]
        if part == "out":
            found.append(NeuronParam(role_w, weight, 0 if conv1d else 1))
        else:
            found.append(NeuronParam(role_w, weight, 1 if conv1d else 0))
            bias = getattr(inner, "bias", None)
            if role_b and isinstance(bias, torch.nn.Parameter):
                found.append(NeuronParam(role_b, bias, 0))
    return found


def as_adapter(model: Any) -> ModelAdapter:
    """Wrap ``model`` in a :class:`ModelAdapter` (an adapter is returned as is).

    Example:
        >>> adapter = as_adapter(model)   # doctest: +SKIP
    """
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


def hook_point_hook_counts(model: Any) -> dict[str, int]:
    """Number of forward/backward hooks on each hook point, for checking nothing was left behind."""
    return {
        name: len(hp._forward_hooks) + len(hp._backward_hooks) + len(getattr(hp, "_forward_pre_hooks", {}))
        for name, hp in as_adapter(model).model.hook_dict.items()
    }


def parameter_fingerprint(model: Any) -> dict[str, bytes]:
    """A byte-exact snapshot key per parameter, for checking a model was restored bit-identically."""
    import hashlib

    net = as_adapter(model).model
    return {
        name: hashlib.sha256(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).digest()
        for name, p in net.named_parameters()
    }
