"""Which metric names a component takes: include globs minus exclude globs, answered once per name.

Globs are ``fnmatch``'s (``*`` crosses dots). A name is taken when an include glob matches and no
exclude glob does; with no include glob nothing is taken. The answer is cached per name (the cache is
emptied past 100,000 names, so name churn cannot grow it): one dict lookup a point.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

_CACHE_MAX = 100_000


def glob_regex(globs: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for any of ``globs``; None for none."""
    parts = [fnmatch.translate(g) for g in globs]
    return re.compile("|".join(parts)) if parts else None


class NameFilter:
    """``filter(name)``: whether ``name`` is taken (see the module docs); ``unless(name)``, when given,
    refuses names the globs would take (say, a processor's own outputs)."""

    __slots__ = ("_cache", "_exclude", "_include", "_unless")

    def __init__(
        self, include: Iterable[str], exclude: Iterable[str] = (), unless: Callable[[str], bool] | None = None
    ) -> None:
        self._include = glob_regex(include)
        self._exclude = glob_regex(exclude)
        self._unless = unless
        self._cache: dict[str, bool] = {}

    @property
    def takes_any(self) -> bool:
        """False when there is no include glob (nothing is ever taken)."""
        return self._include is not None

    def __call__(self, name: str) -> bool:
        hit = self._cache.get(name)
        if hit is None:
            hit = bool(
                self._include is not None
                and self._include.fullmatch(name)
                and not (self._exclude is not None and self._exclude.fullmatch(name))
                and not (self._unless is not None and self._unless(name))
            )
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[name] = hit
        return hit
