"""Registries: build a method or an encoder by name (timm's ``create_model`` idea).

One :class:`Registry` per kind of thing. Built-ins register themselves when their module is
imported; ``load_builtin`` imports them on first use, so ``import histosr`` stays fast. A
name ending in ``":"`` is a prefix entry (``"timm:"`` serves ``"timm:<model>"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InputError
from .params import suggest


class UnknownNameError(InputError):
    """A name that no registry entry has; the message lists the valid ones."""


class Registry:
    def __init__(self, kind: str, load_builtin: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._load_builtin = load_builtin
        self._loaded = load_builtin is None

    def register(self, name: str, **meta):
        """Decorator: register ``obj`` under ``name`` (with optional metadata)."""

        def deco(obj):
            self._entries[name] = obj
            self._meta[name] = meta
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._load_builtin()

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def key(self, name: str) -> str:
        """The registry key serving ``name`` (its prefix entry for ``"prefix:rest"``)."""
        self._load()
        name = str(name)
        if name in self._entries:
            return name
        if ":" in name and name.split(":", 1)[0] + ":" in self._entries:
            return name.split(":", 1)[0] + ":"
        raise UnknownNameError(f"unknown {self.kind} {name!r}{suggest(name, self.names())}: "
                               f"expected one of {', '.join(self.names())}")

    def get(self, name: str):
        return self._entries[self.key(name)]

    def meta(self, name: str) -> dict:
        return self._meta[self.key(name)]

    def __contains__(self, name: str) -> bool:
        try:
            self.key(name)
        except UnknownNameError:
            return False
        return True


__all__ = ["Registry", "UnknownNameError"]
