"""The metadata filters of the search routes, as query parameters (GET) and form fields (POST), made into one SearchFilter.

The index checks a filter too (index/search_filter.py); the limits here are the API's, declared in
its schema so that clients are told them, and equal to the index's (tests/test_app_filters.py).
"""

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Form, Query

from .dependencies import check_text
from .errors import ApiError

if TYPE_CHECKING:  # only a service with an index imports the index package
    from index.search_filter import SearchFilter

MAX_FILTER_TEXT = 1024
MAX_SIDE = 1 << 20
MAX_TIME_TEXT = 20  # "2026-12-02T07:40:31Z"
TIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}Z?)?$"  # what index.search_filter.parse_utc reads


class _Fields:
    """The six filter parameters' types for one kind of FastAPI parameter (Query or Form)."""

    def __init__(self, kind: Any) -> None:
        text = {"min_length": 1, "max_length": MAX_FILTER_TEXT}
        when = {"max_length": MAX_TIME_TEXT, "pattern": TIME_PATTERN, "examples": ["2026-12-02T07:40:31Z"]}
        side = {"ge": 1, "le": MAX_SIDE}
        self.path_prefix = Annotated[str | None, kind(
            **text, description="only images whose stored path (relative to the index root) starts with this")]
        self.caption_contains = Annotated[str | None, kind(
            **text, description="only images whose caption holds this text (case-sensitive)")]
        self.added_after = Annotated[str | None, kind(
            **when, description="only images added at or after this UTC time (ISO 8601, or a date)")]
        self.added_before = Annotated[str | None, kind(**when, description="only images added before this UTC time")]
        self.min_width = Annotated[int | None, kind(**side, description="only images at least this many pixels wide")]
        self.min_height = Annotated[int | None, kind(**side, description="only images at least this many pixels tall")]


_Q, _F = _Fields(Query), _Fields(Form)


def _search_filter(values: dict[str, Any]) -> "SearchFilter | None":
    """The filter, or None when no condition is given; a value the index refuses is a 422."""
    given = {name: value for name, value in values.items() if value is not None}
    if not given:
        return None
    for name in ("path_prefix", "caption_contains", "added_after", "added_before"):
        if name in given:
            check_text(given[name], name, MAX_FILTER_TEXT)
    from index.errors import IndexStoreError
    from index.search_filter import SearchFilter

    try:
        return SearchFilter(**given)
    except IndexStoreError as exc:
        raise ApiError(422, "invalid_filter", str(exc)) from None


async def query_filter(
    path_prefix: _Q.path_prefix = None, caption_contains: _Q.caption_contains = None,
    added_after: _Q.added_after = None, added_before: _Q.added_before = None,
    min_width: _Q.min_width = None, min_height: _Q.min_height = None,
) -> "SearchFilter | None":
    return _search_filter(locals())


async def form_filter(
    path_prefix: _F.path_prefix = None, caption_contains: _F.caption_contains = None,
    added_after: _F.added_after = None, added_before: _F.added_before = None,
    min_width: _F.min_width = None, min_height: _F.min_height = None,
) -> "SearchFilter | None":
    return _search_filter(locals())


QueryFilterDep = Annotated["SearchFilter | None", Depends(query_filter)]
FormFilterDep = Annotated["SearchFilter | None", Depends(form_filter)]
