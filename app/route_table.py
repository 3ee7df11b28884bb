"""The routes a request can reach, for code that must judge a request before FastAPI routes it."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator

from starlette.routing import BaseRoute, Router


def reachable_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, into included routers too.

    FastAPI (0.165 on) keeps an included router as one route wrapping it, so matching the app's own
    list finds the wrapper, not the endpoint (its dependencies and methods). The wrapped routes carry
    their router's dependencies, and their paths are the whole path while include_router adds no prefix.
    """
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is None:
            yield route
            continue
        if getattr(getattr(route, "include_context", None), "prefix", ""):
            raise RuntimeError("include routers without a prefix (set it on the APIRouter): app/route_table.py")
        yield from reachable_routes(inner.routes)


def _routers_in(router: Router) -> list[Router]:
    """The router and every router included in it, each once (whose `routes` lists the flat list was read from)."""
    found: list[Router] = []
    seen: set[int] = set()
    stack = [router]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        stack.extend(inner for route in current.routes if (inner := getattr(route, "original_router", None)) is not None)
    return found


class RouteTable:
    """reachable_routes(router.routes), flattened once rather than walked (a generator per level) on every request.

    The middleware that checks the API key before the body matches every request against it, so the
    walk was per-request work. The list is rebuilt when any routes list it was read from is replaced
    or changes length (a route added or removed, at the top or in an included router).
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._flat: tuple[BaseRoute, ...] = ()
        self._read: tuple[tuple[Router, list[BaseRoute], int], ...] = ()  # (router, its routes list, its length)

    def _current(self) -> bool:
        for owner, routes, length in self._read:
            if owner.routes is not routes or len(routes) != length:
                return False
        return bool(self._read)

    def routes(self) -> tuple[BaseRoute, ...]:
        """Every reachable route, in matching order."""
        if not self._current():
            read = tuple((owner, owner.routes, len(owner.routes)) for owner in _routers_in(self.router))
            self._flat = tuple(reachable_routes(self.router.routes))
            self._read = read
        return self._flat


# id(router) -> its table, held only while something else holds the table (the app's AuthFirstMiddleware)
_TABLES: weakref.WeakValueDictionary[int, RouteTable] = weakref.WeakValueDictionary()


def route_table(router: Router) -> RouteTable:
    """The RouteTable of this router, one per router while the app holds it (the key-first middleware and the
    405 handler share it)."""
    table = _TABLES.get(id(router))
    if table is None or table.router is not router:
        table = _TABLES[id(router)] = RouteTable(router)
    return table
