"""Sites: which hook points to capture, as validated (layer, kind, hook name) triples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from tl_taskmap.models import SITE_ALIASES, SITE_TEMPLATES, as_adapter

SiteSpec = Union[str, tuple[int, str], "Site", Sequence[Union[str, tuple[int, str], "Site"]]]


@dataclass(frozen=True, order=True)
class Site:
    """A hook point to capture: its layer, its kind (``"resid_post"``, ``"mlp_post"``, ...) and hook name."""

    layer: int
    kind: str
    hook_name: str

    def __str__(self) -> str:
        return self.hook_name


def resolve_sites(model: Any, sites: SiteSpec) -> list[Site]:
    """Turn a site specification into validated :class:`Site` objects.

    Accepted forms: a short kind for every layer (``"resid_post"``), a full hook name
    (``"blocks.3.mlp.hook_post"``), a ``(kind, layer)`` pair in TransformerLens's key order
    (``("resid_post", 3)``, as in ``cache["resid_post", 3]``) or a ``(layer, kind)`` pair, a
    :class:`Site`, or a list of these. Negative layers count from the end (``-1`` is the last block).

    Example:
        >>> resolve_sites(model, [(0, "resid_post"), "blocks.1.mlp.hook_post"])   # doctest: +SKIP
        [Site(layer=0, kind='resid_post', hook_name='blocks.0.hook_resid_post'), Site(layer=1, ...)]
    """
    adapter = as_adapter(model)
    items = [sites] if isinstance(sites, (str, Site)) or is_site_pair(sites) else list(sites)
    if not items:
        raise ValueError("no sites given: name at least one, e.g. sites='resid_post' or [(3, 'mlp_post')]")
    out: list[Site] = []
    for item in items:
        if isinstance(item, Site):
            adapter.hook_point(item.hook_name)
            out.append(item)
        elif is_site_pair(item):
            layer, kind = site_pair(item)
            name = adapter.hook_name(layer, kind)
            out.append(Site(layer % adapter.n_layers, SITE_ALIASES.get(kind, kind), name))
        elif isinstance(item, str) and (item in SITE_TEMPLATES or item in SITE_ALIASES):
            kind = SITE_ALIASES.get(item, item)
            out.extend(Site(layer, kind, adapter.hook_name(layer, kind)) for layer in range(adapter.n_layers))
        elif isinstance(item, str) and "." not in item:
            adapter.hook_name(0, item)  # not a site kind: raises with the closest valid site names
        elif isinstance(item, str):
            adapter.hook_point(item)  # raises with the closest valid names
            out.append(_site_from_hook_name(item))
        else:
            raise TypeError(f"cannot read a site from {item!r}; use 'resid_post', (layer, 'mlp_post') or a hook name")
    seen: dict[str, Site] = {}
    for site in out:
        seen.setdefault(site.hook_name, site)
    return list(seen.values())


def parse_site(item: Any, default_kind: str = "resid_post") -> tuple[Optional[int], str]:
    """``(layer, kind)`` named by a site specification, without a model; layer None means every layer.

    The same forms as :func:`resolve_sites`: a kind or alias (every layer), a full hook name, a ``(layer, kind)``
    or ``(kind, layer)`` pair, a :class:`Site`, or a bare layer number (``default_kind`` at that layer). Kinds are
    canonical where they have an alias (``"neurons"`` → ``"mlp_post"``); whether the model has them is the
    caller's check.

    Example:
        >>> parse_site("neurons"), parse_site(("resid_post", 3)), parse_site("blocks.2.mlp.hook_post"), parse_site(4)
        ((None, 'mlp_post'), (3, 'resid_post'), (2, 'mlp_post'), (4, 'resid_post'))
    """
    if isinstance(item, Site):
        return item.layer, SITE_ALIASES.get(item.kind, item.kind)
    if _is_int(item):
        return int(item), default_kind
    if is_site_pair(item):
        layer, kind = site_pair(item)
        return layer, SITE_ALIASES.get(kind, kind)
    if isinstance(item, str) and item.startswith("blocks."):
        parts = item.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return int(parts[1]), SITE_ALIASES.get(parts[2], parts[2])
    if isinstance(item, str):
        return None, SITE_ALIASES.get(item, item)
    raise TypeError(f"cannot read a site from {item!r}; use 'resid_post', (layer, 'mlp_post') or 'blocks.3.hook_resid_post'.")


def is_site_pair(item: Any) -> bool:
    """``(layer, kind)`` or TransformerLens's ``(kind, layer)``."""
    if not isinstance(item, tuple) or len(item) != 2:
        return False
    a, b = item
    return (_is_int(a) and isinstance(b, str)) or (isinstance(a, str) and _is_int(b))


def site_pair(item: tuple) -> tuple[int, str]:
    """``(layer, kind)`` from either order. Example: ``site_pair(("resid_post", -1))`` → ``(-1, 'resid_post')``."""
    a, b = item
    return (int(b), str(a)) if isinstance(a, str) else (int(a), str(b))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or type(x).__name__ in ("int64", "int32")


def _site_from_hook_name(name: str) -> Site:
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1
    for kind, template in SITE_TEMPLATES.items():
        if layer >= 0 and template.format(layer=layer) == name:
            return Site(layer, kind, name)
    return Site(layer, "hook", name)
