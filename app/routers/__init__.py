"""One router per resource; main.create_app includes them all."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..dependencies import require_read_key
from ..forms import StrictFormRoute


def read_router(*, tags: list[str], prefix: str = "") -> APIRouter:
    """A router of read endpoints: strict form parsing, and the read key when reads are protected."""
    return APIRouter(route_class=StrictFormRoute, prefix=prefix, tags=tags, dependencies=[Depends(require_read_key)])
