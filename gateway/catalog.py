"""Model names: a requested name or alias → the canonical model, checked against the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.auth import Principal
from gateway.config import Catalog, ModelConfig
from gateway.errors import NotFound, PermissionDenied


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # canonical
    config: ModelConfig


class ModelCatalog:
    """Precomputed name → model map, so resolution costs one dict lookup per request."""

    def __init__(self, catalog: Catalog, created: int) -> None:
        self._models = {name: ResolvedModel(name, cfg) for name, cfg in catalog.models.items()}
        self._names: dict[str, ResolvedModel] = {}
        for name, resolved in self._models.items():
            self._names[name] = resolved
            for alias in resolved.config.aliases:
                self._names[alias] = resolved
        self._created = created

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ResolvedModel | None:
        return self._names.get(name)

    def resolve(self, requested: str, principal: Principal) -> ResolvedModel:
        """404 for a name nobody serves; 403 for one this key may not use."""
        resolved = self._names.get(requested)
        if resolved is None:
            raise NotFound(f"The model {requested!r} does not exist.", param="model",
                           code="model_not_found")
        if not principal.may_use(resolved.name):
            raise PermissionDenied(
                f"This API key may not use the model {resolved.name!r}.", param="model")
        return resolved

    def listing(self, principal: Principal) -> dict[str, Any]:
        """OpenAI's list shape, canonical ids, aliases in a field."""
        data = [
            {"id": r.name, "object": "model", "created": self._created, "owned_by": "plateforme",
             "aliases": list(r.config.aliases), "upstream_model": r.config.upstream_model,
             "context_window": r.config.context_window, "max_model_len": r.config.context_window}
            for r in self._models.values() if principal.may_use(r.name)
        ]
        return {"object": "list", "data": data}
