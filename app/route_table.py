"""The routes a request can reach, for code that must judge a request before FastAPI routes it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from starlette.routing import BaseRoute


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
