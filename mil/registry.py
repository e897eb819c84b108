"""Name → constructor registries (timm style), shared by poolings, heads and losses.

POOLINGS = Registry("pooling")

@POOLINGS.register
def mean(dim, **kw): ...

POOLINGS.create("mean", dim=512)        # None-valued kwargs are dropped, so CLI defaults of
                                        # None never override a constructor's own defaults
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from mil.errors import OptionError


class Registry:
    """A named table of constructors with `register`, `create`, `names` and `has`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None):
        """Decorator: register `fn` under `name` (default: its ``__name__``)."""

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = f
            return f

        return add if fn is None else add(fn)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the entry called `name` with `kwargs` (those that are None are dropped)."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"expected a {self.kind} name among {', '.join(self.names())}, got {name!r} instead{hint}")
        return self._entries[name](**{k: v for k, v in kwargs.items() if v is not None})
