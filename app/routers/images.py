"""GET /images/{id} (the stored image or a thumbnail), POST /images and DELETE /images/{id} (API key)."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from model.errors import ClipforgeError

from ..dependencies import (
    ClipDep,
    DecoderDep,
    IndexDep,
    MetricsDep,
    SettingsDep,
    WorkerDep,
    check_texts,
    require_read_key,
    require_write_key,
)
from ..errors import ApiError, error_responses
from ..forms import StrictFormRoute
from ..schemas import (
    AddedImage,
    AddImagesResponse,
    DeleteImageResponse,
    ErrorBody,
    FailedImage,
)

if TYPE_CHECKING:
    from index import AddReport, ImageIndex

router = APIRouter(route_class=StrictFormRoute, prefix="/images", tags=["images"])

_IMAGE_CONTENT = {"image/*": {"schema": {"type": "string", "format": "binary"}}}


def _stored_path(index: ImageIndex, image_id: int) -> Path:
    """The file of an indexed image, guaranteed inside the index root; 404 otherwise.

    Blocking (a Milvus store fetches the bytes into its cache): called in the thread pool.
    """
    if index.get(image_id) is None:
        raise ApiError(404, "not_found", f"no image with id {image_id} in the index")
    try:
        path = Path(index.resolve_path(image_id))
    except ClipforgeError as exc:  # a stored path that would leave the root is never served
        if getattr(exc, "unavailable", False):  # the store did not answer: app/errors.py's 503
            raise
        raise ApiError(404, "not_found", f"image {image_id} has no servable file") from None
    if not path.is_file():
        raise ApiError(404, "not_found", f"the file of image {image_id} is missing from the index root")
    return path


@router.get(
    "/{id}", operation_id="get_image", dependencies=[Depends(require_read_key)],
    response_class=Response, responses={200: {"content": _IMAGE_CONTENT, "description": "The image file or a JPEG thumbnail"},
                                        **error_responses(401, 403, 404, 413, 415, 422, 503)},
    summary="Fetch an indexed image",
)
async def get_image(
    settings: SettingsDep, index: IndexDep, decoder: DecoderDep,
    id: Annotated[int, PathParam(ge=0, le=2**62, description="image id, as returned by search")],
    size: Annotated[int | None, Query(ge=16, description="longest side of a JPEG thumbnail (16 to the server's max_thumbnail)")] = None,
) -> Response:
    """The stored file as it is, or a JPEG thumbnail no larger than size x size."""
    path = await run_in_threadpool(_stored_path, index, id)
    if size is None:
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})
    if size > settings.max_thumbnail:
        raise ApiError(422, "invalid_size", f"size must be between 16 and {settings.max_thumbnail}, got {size}")
    data = await decoder.thumbnail(path, size)  # priced from the header and held to the decode budget
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


def _added_names(items: list[tuple[str, bytes, str | None]], report: AddReport) -> list[str]:
    """File names of the added ids: the inputs that neither failed nor were duplicates, in input order."""
    skipped: dict[str, int] = {}
    for name, _ in [*report.failed, *report.duplicates]:
        skipped[str(name)] = skipped.get(str(name), 0) + 1
    names = []
    for name, _, _ in items:
        if skipped.get(name, 0):
            skipped[name] -= 1
        else:
            names.append(name)
    return names


@router.post(
    "", operation_id="add_images", response_model=AddImagesResponse, dependencies=[Depends(require_write_key)],
    responses=error_responses(400, 401, 403, 413, 422, 503), summary="Add images to the index (API key)",
)
async def add_images(
    settings: SettingsDep, metrics: MetricsDep, clip: ClipDep, decoder: DecoderDep, worker: WorkerDep, index: IndexDep,
    images: Annotated[list[UploadFile], File(description="image files (repeat the field)")],
    captions: Annotated[list[str], Form(description="optional captions, one per image, in the same order")] = [],  # noqa: B006 - FastAPI deep-copies defaults
) -> AddImagesResponse:
    """Embed and store the uploads; undecodable files are reported per item, the others are still added."""
    if len(images) > settings.max_images:
        raise ApiError(422, "too_many_images", f"{len(images)} images given; the limit is {settings.max_images}")
    if captions:
        if len(captions) != len(images):
            raise ApiError(422, "captions_mismatch", f"{len(captions)} captions for {len(images)} images; "
                           "send one caption per image or none")
        captions = check_texts(captions, "captions", settings.max_images, settings.max_text_chars)
    items, refused, peak = [], [], 0
    for i, upload in enumerate(images):
        data = await upload.read()
        name = upload.filename or f"upload{i}"
        try:  # priced from its header: one that would decode past the budget is refused before the model thread
            peak = max(peak, decoder.upload_peak(data))
        except ApiError as err:
            refused.append(FailedImage(filename=name, error=ErrorBody(code=err.code, message=err.message)))
            continue
        items.append((name, data, captions[i] if captions else None))
    async with decoder.holding(peak):  # the index decodes one upload at a time
        report = await worker.run(lambda: index.add_bytes(clip, items, max_bytes=settings.max_upload_bytes))
    metrics.index_size.set(len(index))
    names = _added_names(items, report)
    if len(names) != len(report.added):  # never guess: without a safe pairing, report ids only
        names = [""] * len(report.added)
    return AddImagesResponse(
        added=[AddedImage(id=int(i), filename=n) for i, n in zip(report.added, names)],
        duplicates=[AddedImage(id=int(i), filename=str(n)) for n, i in report.duplicates],
        failed=refused + [FailedImage(filename=str(n), error=ErrorBody(code="invalid_image", message=str(why)))
                          for n, why in report.failed],
        size=len(index),
    )


@router.delete(
    "/{id}", operation_id="delete_image", response_model=DeleteImageResponse, dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 403, 404, 422, 503), summary="Remove an image from the index (API key)",
)
async def delete_image(
    metrics: MetricsDep, worker: WorkerDep, index: IndexDep,
    id: Annotated[int, PathParam(ge=0, le=2**62, description="image id")],
) -> DeleteImageResponse:
    """Remove one image from the index (its stored file stays on disk)."""
    removed = await worker.run(index.remove, [id])
    if not removed:
        raise ApiError(404, "not_found", f"no image with id {id} in the index")
    metrics.index_size.set(len(index))
    return DeleteImageResponse(deleted=int(removed), size=len(index))
